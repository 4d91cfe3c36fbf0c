use std::sync::Arc;
use std::time::{Duration, Instant};

use super::util::*;
use crate::{
    create_qcow2_overlay, open_image, Completion, DiskImage, EngineConfig, EngineKind, Error,
    ImageFormat, IoEngine, OpenOptions, Request, RequestKind,
};

/// Waits on the engine's event fd (as a device thread would) until `n` completions arrived.
fn collect(engine: &IoEngine, n: usize) -> Vec<Completion> {
    use std::os::unix::io::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions",
            out.len()
        );
        let mut pfd = libc::pollfd {
            fd: engine.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        out.extend(engine.take_completions());
    }
    out
}

fn images() -> (vmm_sys_util::tempdir::TempDir, Vec<Arc<dyn DiskImage>>) {
    let dir = tmpdir();
    let d = dir.as_path();
    write_file(&d.join("disk.raw"), &vec![0u8; 8 << 20]);
    write_file(&d.join("base.raw"), &pattern(8 << 20, 1));
    create_qcow2_overlay(&d.join("ov.qcow2"), &d.join("base.raw"), ImageFormat::Raw).unwrap();
    let raw = open_image(&d.join("disk.raw"), &OpenOptions::default()).unwrap();
    let qcow = open_image(&d.join("ov.qcow2"), &OpenOptions::default()).unwrap();
    (dir, vec![raw, qcow])
}

#[test]
fn many_requests_in_flight_complete_with_the_right_data() {
    let (_dir, imgs) = images();
    for img in imgs {
        let engine = IoEngine::new(img.clone(), EngineConfig::default()).unwrap();
        assert_eq!(engine.engine_name(), "thread-pool");
        let n = 256u64;
        // Writes of 6 KiB blocks (straddling clusters), three buffers each.
        for i in 0..n {
            let data = pattern(6144, i as u8);
            engine
                .submit(Request {
                    kind: RequestKind::Write,
                    offset: i * 6144 * 5,
                    buffers: vec![
                        data[..1000].to_vec(),
                        data[1000..4096].to_vec(),
                        data[4096..].to_vec(),
                    ],
                    user_data: i,
                })
                .unwrap();
        }
        let done = collect(&engine, n as usize);
        let mut seen: Vec<u64> = done.iter().map(|c| c.user_data).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        for c in &done {
            assert_eq!(*c.result.as_ref().unwrap(), 6144);
        }
        engine
            .submit(Request {
                kind: RequestKind::Flush,
                offset: 0,
                buffers: vec![],
                user_data: 999,
            })
            .unwrap();
        assert!(collect(&engine, 1)[0].result.is_ok());
        for i in 0..n {
            engine
                .submit(Request {
                    kind: RequestKind::Read,
                    offset: i * 6144 * 5,
                    buffers: vec![vec![0u8; 2048], vec![0u8; 4096]],
                    user_data: 1000 + i,
                })
                .unwrap();
        }
        for c in collect(&engine, n as usize) {
            let i = c.user_data - 1000;
            assert_eq!(*c.result.as_ref().unwrap(), 6144);
            assert_eq!(c.buffers.concat(), pattern(6144, i as u8), "request {i}");
        }
    }
}

#[test]
fn failed_and_special_requests_complete_too() {
    let (_dir, imgs) = images();
    for img in imgs {
        let size = img.size();
        let engine = IoEngine::new(
            img.clone(),
            EngineConfig {
                kind: EngineKind::ThreadPool,
                workers: 2,
            },
        )
        .unwrap();
        let reqs = [
            (RequestKind::Read, size - 100, vec![vec![0u8; 512]]),
            (RequestKind::Write, u64::MAX - 10, vec![vec![0u8; 512]]),
            (RequestKind::WriteZeroes { len: 1 << 20 }, 0, vec![]),
            (RequestKind::Discard { len: 1 << 20 }, 1 << 20, vec![]),
            (RequestKind::Discard { len: 2 }, size - 1, vec![]),
        ];
        for (i, (kind, offset, buffers)) in reqs.into_iter().enumerate() {
            engine
                .submit(Request {
                    kind,
                    offset,
                    buffers,
                    user_data: i as u64,
                })
                .unwrap();
        }
        let mut done = collect(&engine, 5);
        done.sort_by_key(|c| c.user_data);
        assert!(matches!(done[0].result, Err(Error::OutOfRange { .. })));
        assert!(matches!(done[1].result, Err(Error::OutOfRange { .. })));
        assert_eq!(*done[2].result.as_ref().unwrap(), 1 << 20);
        assert_eq!(*done[3].result.as_ref().unwrap(), 1 << 20);
        assert!(matches!(done[4].result, Err(Error::OutOfRange { .. })));
        let mut buf = vec![1u8; 1 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}

#[test]
fn dropping_the_engine_finishes_queued_requests() {
    let (_dir, imgs) = images();
    let img = imgs[1].clone();
    let engine = IoEngine::new(
        img.clone(),
        EngineConfig {
            kind: EngineKind::Auto,
            workers: 1,
        },
    )
    .unwrap();
    for i in 0..64u64 {
        engine
            .submit(Request {
                kind: RequestKind::Write,
                offset: i * 65536,
                buffers: vec![vec![0xee; 512]],
                user_data: i,
            })
            .unwrap();
    }
    drop(engine);
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 63 * 65536).unwrap();
    assert_eq!(buf, [0xee; 512]);
}
