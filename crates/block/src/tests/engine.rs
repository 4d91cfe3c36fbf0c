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
    let raw_opts = OpenOptions {
        format: Some(ImageFormat::Raw),
        ..OpenOptions::default()
    };
    let raw = open_image(&d.join("disk.raw"), &raw_opts).unwrap();
    let qcow = open_image(&d.join("ov.qcow2"), &OpenOptions::default()).unwrap();
    (dir, vec![raw, qcow])
}

/// Every engine that can run on `img`: the thread pool always, io_uring for raw images
/// when the host has it (else the test says it skipped that part).
fn engines(img: &Arc<dyn DiskImage>, test: &str) -> Vec<IoEngine> {
    let pool = EngineConfig {
        kind: EngineKind::ThreadPool,
        workers: 4,
        thread_start: None,
    };
    let mut out = vec![IoEngine::new(img.clone(), pool).unwrap()];
    assert_eq!(out[0].engine_name(), "thread-pool");
    let uring = EngineConfig {
        kind: EngineKind::IoUring,
        workers: 4,
        thread_start: None,
    };
    match IoEngine::new(img.clone(), uring) {
        Ok(e) => {
            assert_eq!(e.engine_name(), "io_uring");
            out.push(e);
        }
        Err(e) if img.format() == ImageFormat::Qcow2 && cfg!(feature = "io-uring") => {
            assert!(e.to_string().contains("not a raw file"), "{e}");
        }
        Err(e) => eprintln!("SKIPPED {test} (io_uring part): {e}"),
    }
    // Auto picks io_uring exactly when it is usable.
    let auto = IoEngine::new(img.clone(), EngineConfig::default()).unwrap();
    assert_eq!(auto.engine_name(), out.last().unwrap().engine_name());
    out
}

fn each_engine(test: &str, mut f: impl FnMut(&Arc<dyn DiskImage>, IoEngine)) {
    let (_dir, imgs) = images();
    for img in &imgs {
        for engine in engines(img, test) {
            f(img, engine);
        }
    }
}

#[test]
fn many_requests_in_flight_complete_with_the_right_data() {
    each_engine("many_requests_in_flight", |img, engine| {
        img.write_zeroes(0, img.size()).unwrap();
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
        let mut buf = vec![0u8; 6144];
        img.read_at(&mut buf, 17 * 6144 * 5).unwrap();
        assert_eq!(buf, pattern(6144, 17), "{}", engine.engine_name());
    });
}

#[test]
fn failed_and_special_requests_complete_too() {
    each_engine("failed_and_special_requests", |img, engine| {
        let size = img.size();
        img.write_at(&vec![9u8; 2 << 20], 0).unwrap();
        let reqs = [
            (RequestKind::Read, size - 100, vec![vec![0u8; 512]]),
            (RequestKind::Write, u64::MAX - 10, vec![vec![0u8; 512]]),
            (RequestKind::WriteZeroes { len: 1 << 20 }, 0, vec![]),
            (RequestKind::Discard { len: 1 << 20 }, 1 << 20, vec![]),
            (RequestKind::Discard { len: 2 }, size - 1, vec![]),
            (RequestKind::Read, 0, vec![]),
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
        let mut done = collect(&engine, 6);
        done.sort_by_key(|c| c.user_data);
        assert!(matches!(done[0].result, Err(Error::OutOfRange { .. })));
        assert!(matches!(done[1].result, Err(Error::OutOfRange { .. })));
        assert_eq!(*done[2].result.as_ref().unwrap(), 1 << 20);
        assert_eq!(*done[3].result.as_ref().unwrap(), 1 << 20);
        assert!(matches!(done[4].result, Err(Error::OutOfRange { .. })));
        assert_eq!(*done[5].result.as_ref().unwrap(), 0);
        let mut buf = vec![1u8; 1 << 20];
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{}", engine.engine_name());
    });
}

#[test]
fn read_only_images_refuse_writes_through_the_engine() {
    let dir = tmpdir();
    let p = dir.as_path().join("ro.raw");
    write_file(&p, &[3u8; 65536]);
    let opts = OpenOptions {
        format: Some(ImageFormat::Raw),
        read_only: true,
        direct: false,
    };
    let img = open_image(&p, &opts).unwrap();
    for engine in engines(&img, "read_only_images_refuse_writes") {
        for (i, kind) in [
            RequestKind::Write,
            RequestKind::Discard { len: 512 },
            RequestKind::Flush,
        ]
        .into_iter()
        .enumerate()
        {
            let buffers = if kind == RequestKind::Write {
                vec![vec![0u8; 512]]
            } else {
                vec![]
            };
            engine
                .submit(Request {
                    kind,
                    offset: 0,
                    buffers,
                    user_data: i as u64,
                })
                .unwrap();
        }
        let mut done = collect(&engine, 3);
        done.sort_by_key(|c| c.user_data);
        assert!(matches!(done[0].result, Err(Error::ReadOnly { .. })));
        assert!(matches!(done[1].result, Err(Error::ReadOnly { .. })));
        assert!(
            done[2].result.is_ok(),
            "flush of a read-only disk is a no-op"
        );
    }
    assert_eq!(std::fs::read(&p).unwrap(), vec![3u8; 65536]);
}

#[test]
fn dropping_the_engine_finishes_queued_requests() {
    each_engine("dropping_the_engine", |img, engine| {
        img.write_zeroes(0, img.size()).unwrap();
        // More than the io_uring ring holds at once, so some wait in its queue.
        for i in 0..300u64 {
            engine
                .submit(Request {
                    kind: RequestKind::Write,
                    offset: i * 16384,
                    buffers: vec![vec![0xee; 512]],
                    user_data: i,
                })
                .unwrap();
        }
        drop(engine);
        for i in [0u64, 150, 299] {
            let mut buf = [0u8; 512];
            img.read_at(&mut buf, i * 16384).unwrap();
            assert_eq!(buf, [0xee; 512], "block {i}");
        }
    });
}
