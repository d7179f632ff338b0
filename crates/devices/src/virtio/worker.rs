//! One thread per virtio device: it waits on the device's queue-notification eventfds (KVM's
//! ioeventfds, so a guest notification never exits to user space) and on the host file
//! descriptors the device watches, and runs the device. A device busy with I/O therefore never
//! holds up a vCPU, the console or another device.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::DeviceEvents;
use super::mmio::MmioTransport;

const STOP_TOKEN: u64 = u64::MAX;

/// A running device thread; dropping it stops and joins the thread.
pub struct DeviceWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceWorker")
    }
}

impl DeviceWorker {
    /// Starts the thread `name` for `transport`. `notifiers[i]` is queue `i`'s notification
    /// eventfd; `events` is the set the device registers its own descriptors in.
    pub fn spawn(
        name: &str,
        transport: Arc<MmioTransport>,
        notifiers: Vec<EventFd>,
        events: DeviceEvents,
    ) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        events.add(
            stop.as_raw_fd(),
            STOP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        for (i, evt) in notifiers.iter().enumerate() {
            events.add(evt.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&transport, &notifiers, &events))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(transport: &MmioTransport, notifiers: &[EventFd], events: &DeviceEvents) {
    if let Err(e) = bulwark_sandbox::seccomp::confine_thread(bulwark_sandbox::seccomp::Role::Device)
    {
        tracing::error!(error = %e, "virtio device thread: no seccomp filter; device stops");
        return;
    }
    let mut ready = vec![EpollEvent::default(); 32];
    loop {
        let n = match events.epoll().wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "virtio device thread: epoll failed; device stops");
                return;
            }
        };
        for ev in &ready[..n] {
            match ev.data() {
                STOP_TOKEN => return,
                q if q < notifiers.len() as u64 => {
                    // Several notifications may have been coalesced; one pass serves them all.
                    let _ = notifiers[q as usize].read();
                    transport.queue_notify(q as u32);
                }
                token => transport.host_event(token, ev.event_set()),
            }
        }
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
