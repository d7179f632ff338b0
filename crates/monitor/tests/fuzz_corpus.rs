//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the fuzz harnesses in
//! `bulwark_monitor::fuzz`, so every input the fuzzers kept — crash reproducers included — is a
//! regression test in plain `cargo test`, without cargo-fuzz or a nightly toolchain.
//!
//! A corpus directory that is missing or empty fails the test: a replay that replays nothing
//! must not pass.

#[path = "../../../fuzz/replay.rs"]
mod replay;

use replay::replay;

#[test]
fn exit_dispatch_corpus_replays_without_failure() {
    replay("exit_dispatch", bulwark_monitor::fuzz::exit_dispatch);
}

#[test]
fn hostcall_corpus_replays_without_failure() {
    replay("hostcall", bulwark_monitor::fuzz::hostcall);
}

#[test]
fn payload_image_corpus_replays_without_failure() {
    replay("payload_image", bulwark_monitor::fuzz::payload_image);
}

#[test]
fn linux_platform_corpus_replays_without_failure() {
    replay("linux_platform", bulwark_monitor::fuzz::linux_platform);
}

#[test]
fn virtio_mmio_corpus_replays_without_failure() {
    replay("virtio_mmio", bulwark_monitor::fuzz::virtio_mmio);
}

#[test]
fn virtqueue_corpus_replays_without_failure() {
    replay("virtqueue", bulwark_monitor::fuzz::virtqueue);
}

#[test]
fn virtio_blk_corpus_replays_without_failure() {
    replay("virtio_blk", bulwark_monitor::fuzz::virtio_blk);
}

#[test]
fn virtio_vsock_corpus_replays_without_failure() {
    replay("virtio_vsock", bulwark_monitor::fuzz::virtio_vsock);
}

#[test]
fn virtio_net_corpus_replays_without_failure() {
    replay("virtio_net", bulwark_monitor::fuzz::virtio_net);
}

#[test]
fn control_channel_corpus_replays_without_failure() {
    replay("control_channel", bulwark_monitor::fuzz::control_channel);
}

#[test]
fn snapshot_stream_seeds_restore() {
    use std::io::Read;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let regions = [(0u64, 0x4000u64), (0x10_0000, 0x2000)];
    let seeds = bulwark_monitor::fuzz::snapshot_stream_seeds();
    for (i, seed) in seeds.iter().enumerate() {
        let mem = GuestMemoryMmap::<()>::from_ranges(
            &regions
                .iter()
                .map(|&(g, s)| (GuestAddress(g), s as usize))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut reader = bulwark_monitor::snapshot::RecordReader::new(Box::new(
            std::io::Cursor::new(seed.clone()),
        )
            as Box<dyn Read + Send>);
        let header = reader.header().unwrap();
        let restore = bulwark_monitor::snapshot::Restore {
            header,
            reader,
            lazy: None,
        };
        let state = restore.read_body(&mem, &regions).unwrap();
        assert_eq!(state.devices.len(), 2, "seed {i}");
        // The third seed wrote one word in each region; it came back.
        if i == 2 {
            for at in [0x10u64, 0x10_1000] {
                assert_eq!(mem.read_obj::<u32>(GuestAddress(at)).unwrap(), 0x5eed);
            }
        }
        if std::env::var_os("BULWARK_WRITE_SEEDS").is_some() {
            let dir = replay::corpus_dir("snapshot_stream");
            std::fs::write(dir.join(format!("seed-v2-{i}")), seed).unwrap();
        }
    }
}

#[test]
fn snapshot_stream_corpus_replays_without_failure() {
    replay("snapshot_stream", bulwark_monitor::fuzz::snapshot_stream);
}
