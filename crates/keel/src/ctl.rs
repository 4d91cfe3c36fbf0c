//! `keel ctl`: talk to a running VMM through its API socket.

use keel_api::{Client, ClientError, Request};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct CtlArgs {
    /// The VMM's API socket (`keel run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(clap::Subcommand)]
enum Verb {
    /// Check that the VMM answers.
    Ping,
    /// The VM's shape and the VMM's memory use, as JSON.
    Info,
    /// Set the balloon target (memory taken from the guest), e.g. 256M; 0 deflates it.
    Balloon {
        #[arg(value_parser = crate::memory_size)]
        target: u64,
    },
    /// The balloon's size and the guest's memory statistics, as JSON.
    BalloonStats,
    /// Stop the guest's vCPUs (answers once they have stopped); devices keep their state.
    Pause,
    /// Let a paused guest run again.
    Resume,
}

pub fn run(args: CtlArgs) -> ExitCode {
    let req = match args.verb {
        Verb::Ping => Request::Ping,
        Verb::Info => Request::Info,
        Verb::Balloon { target } => Request::BalloonSet {
            target_bytes: target,
        },
        Verb::BalloonStats => Request::BalloonStats,
        Verb::Pause => Request::Pause,
        Verb::Resume => Request::Resume,
    };
    call(&args.api_socket, req)
}

/// Sends one request, prints the reply as JSON.
pub fn call(socket: &std::path::Path, req: Request) -> ExitCode {
    let result = Client::connect(socket).and_then(|mut c| c.call(&req));
    match result {
        Ok(reply) => {
            match serde_json::to_string_pretty(&reply) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("keel: cannot print the reply: {e}"),
            }
            ExitCode::SUCCESS
        }
        Err(e @ ClientError::Refused(_)) => {
            eprintln!("keel: the VMM refused: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("keel: {e}");
            ExitCode::from(1)
        }
    }
}
