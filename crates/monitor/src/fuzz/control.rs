//! Harnesses for what reaches the monitor from outside the guest: the control channel's
//! decoder (bytes from bulwarkd), and a snapshot's record stream and device states (bytes the
//! VM owner sealed, which a restore trusts only after authentication — fuzzed anyway, since a
//! parser bug there would let a key holder attack the monitor).

use std::io::Cursor;
use std::sync::Arc;

use bulwark_channel::{FrameBuffer, Request, Response};
use bulwark_devices::console::ConsoleSink;
use bulwark_devices::serial::Serial16550;
use bulwark_devices::state::DeviceState;
use bulwark_devices::virtio::mmio::MmioTransport;
use bulwark_devices::virtio::rng::Rng;
use bulwark_devices::virtio::{Interrupt, InterruptLine};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::{RecordReader, Restore};

/// Control channel frames: any split of any bytes decodes to a request or an error, never a
/// panic; a decoded request encodes to a frame that decodes to itself. The same frames are
/// decoded as responses too: bulwarkd reads those from a monitor, which a guest may have taken
/// over.
pub fn control_channel(data: &[u8]) {
    let mut fb = FrameBuffer::default();
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    for part in [&data[..cut], &data[cut..]] {
        fb.extend(part);
        while let Ok(Some(frame)) = fb.next_frame() {
            if let Ok(req) = bulwark_channel::decode::<Request>(&frame) {
                let again = bulwark_channel::encode(&req);
                let back: Request =
                    bulwark_channel::decode(&again[4..]).expect("an encoded request decodes");
                assert_eq!(back, req, "request did not round-trip");
            }
            if let Ok(resp) = bulwark_channel::decode::<Response>(&frame) {
                let again = bulwark_channel::encode(&resp);
                let back: Response =
                    bulwark_channel::decode(&again[4..]).expect("an encoded response decodes");
                assert_eq!(back, resp, "response did not round-trip");
            }
        }
    }
}

struct NoLine;

impl InterruptLine for NoLine {
    fn trigger(&self) {}
}

/// Two small RAM regions, as a Linux VM has around its MMIO gap.
const REGIONS: [(u64, u64); 2] = [(0, 0x4000), (0x10_0000, 0x2000)];

/// Fresh guest memory laid out as [`REGIONS`].
fn regions_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(
        &REGIONS
            .iter()
            .map(|&(g, s)| (GuestAddress(g), s as usize))
            .collect::<Vec<_>>(),
    )
    .expect("guest memory")
}

/// Valid record streams for [`snapshot_stream`] to start from: a header for [`REGIONS`], vCPU
/// and VM-wide records, a UART and a virtio transport record, and memory with some blocks
/// stored and some zero. Each restores in the harness (the corpus test checks).
pub fn snapshot_stream_seeds() -> Vec<Vec<u8>> {
    use crate::snapshot::{Header, RecordWriter, SNAPSHOT_FORMAT, Tag};
    use vm_memory::Bytes;
    let mem = |written: &[u64]| {
        let mem = regions_memory();
        for &at in written {
            mem.write_obj(0x5eed_u32, GuestAddress(at)).expect("in RAM");
        }
        mem
    };
    let sink = Arc::new(ConsoleSink::new(Box::new(std::io::sink()), 1 << 20));
    let serial = Serial16550::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"), sink);
    let transport = MmioTransport::new(
        Box::new(Rng::new()),
        mem(&[]),
        Interrupt::new(Arc::new(NoLine)),
    );
    let mut seeds = Vec::new();
    for (vcpus, written) in [
        (1u32, &[][..]),
        (2, &[0x1000][..]),
        (1, &[0x10, 0x10_1000][..]),
    ] {
        let mut w = RecordWriter::new(Vec::new());
        w.header(&Header {
            format: SNAPSHOT_FORMAT,
            kind: "linux".into(),
            spec: "{}".into(),
            vcpus,
            regions: REGIONS.to_vec(),
            clock_ns: 1,
        })
        .expect("header");
        for i in 0..vcpus {
            w.kvm(Tag::Regs, i, &kvm_bindings::kvm_regs::default())
                .expect("regs");
        }
        w.kvm(Tag::Clock, 0, &kvm_bindings::kvm_clock_data::default())
            .expect("clock");
        w.record(Tag::Device, 0, &serial.save_state())
            .expect("uart");
        w.record(Tag::Device, 16, &transport.save_state())
            .expect("transport");
        w.memory(&mem(written), &REGIONS, &|_, _| None)
            .expect("memory");
        seeds.push(w.end().expect("end"));
    }
    seeds
}

/// A snapshot's plaintext record stream restored into small guest memory, and every device
/// record offered to a real UART and a real virtio-mmio transport: errors, never panics, and
/// a stream that restores has put every region in place.
pub fn snapshot_stream(data: &[u8]) {
    let mem = regions_memory();
    let mut reader = RecordReader::new(Box::new(Cursor::new(data.to_vec())) as Box<_>);
    let Ok(header) = reader.header() else {
        return;
    };
    let Ok(state) = (Restore {
        header,
        reader,
        lazy: None,
    })
    .read_body(&mem, &REGIONS) else {
        return;
    };
    let sink = Arc::new(ConsoleSink::new(Box::new(std::io::sink()), 1 << 20));
    let serial = Serial16550::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"), sink);
    for (_, data) in &state.devices {
        let _ = serial.restore_state(data);
        let transport = MmioTransport::new(
            Box::new(Rng::new()),
            mem.clone(),
            Interrupt::new(Arc::new(NoLine)),
        );
        if transport.restore_state(data).is_ok() {
            // What was restored saves again and restores into a fresh transport.
            let saved = transport.save_state();
            let fresh = MmioTransport::new(
                Box::new(Rng::new()),
                mem.clone(),
                Interrupt::new(Arc::new(NoLine)),
            );
            fresh
                .restore_state(&saved)
                .expect("a saved transport state restores");
        }
    }
}
