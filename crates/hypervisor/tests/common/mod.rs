//! What the hypervisor's KVM tests share.

use libtest_mimic::Trial;

/// `trials`, reported ignored (loudly, never passed) when /dev/kvm cannot be opened.
pub fn skip_without_kvm(trials: Vec<Trial>, what: &str) -> Vec<Trial> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => trials,
        Err(e) => {
            eprintln!(
                "\n*** SKIPPING {} {what}: /dev/kvm: {e} ***\n",
                trials.len()
            );
            trials
                .into_iter()
                .map(|t| t.with_ignored_flag(true))
                .collect()
        }
    }
}
