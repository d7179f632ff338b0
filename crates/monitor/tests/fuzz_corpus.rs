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
fn snapshot_stream_corpus_replays_without_failure() {
    replay("snapshot_stream", bulwark_monitor::fuzz::snapshot_stream);
}
