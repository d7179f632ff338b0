//! The virtio-mmio transport (version 2, virtio 1.x): the register window a guest driver
//! programs to negotiate features, set up queues and start the device.
//!
//! The guest can write any register at any time; the transport follows the specification's
//! state machine and ignores what it does not allow (queue set-up after `DRIVER_OK`, feature
//! writes after `FEATURES_OK`, status bits out of order). A driver that starts the device with
//! unusable queues gets `NEEDS_RESET` and a configuration interrupt, never a crash.

use std::sync::Mutex;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{INT_CONFIG, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, status};

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x4b57_4c42; // "BLWK"
/// Size of the register window, configuration space included.
pub const WINDOW: u64 = 0x200;
const CONFIG_START: u64 = 0x100;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;

struct State {
    device: Box<dyn VirtioDevice>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
    active: bool,
}

/// A virtio device behind its MMIO register window.
pub struct MmioTransport {
    state: Mutex<State>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
}

/// A transport's registers in a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedTransport {
    device_type: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    interrupt_status: u32,
    queues: Vec<SavedQueue>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedQueue {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

fn split(addr: u64) -> (Option<u32>, Option<u32>) {
    (Some(addr as u32), Some((addr >> 32) as u32))
}

/// A transport whose device cannot run (its worker waits for the lock) until this is dropped:
/// how a snapshot keeps devices from writing guest memory while it is copied.
pub struct FrozenTransport<'a> {
    s: std::sync::MutexGuard<'a, State>,
    interrupt: &'a Interrupt,
}

impl FrozenTransport<'_> {
    pub fn save_state(&self) -> Vec<u8> {
        crate::state::encode(&MmioTransport::save(&self.s, self.interrupt))
    }
}

impl MmioTransport {
    /// Stops the device from running until the guard is dropped.
    pub fn freeze(&self) -> FrozenTransport<'_> {
        FrozenTransport {
            s: self.lock(),
            interrupt: &self.interrupt,
        }
    }
}

impl crate::state::DeviceState for MmioTransport {
    fn save_state(&self) -> Vec<u8> {
        self.freeze().save_state()
    }

    /// Puts the registers back and, if the driver had started the device, starts it again
    /// on its live rings. Everything a guest could have put in the registers is checked
    /// the way the register writes are.
    fn restore_state(&self, data: &[u8]) -> Result<(), crate::state::StateError> {
        use crate::state::StateError;
        let saved: SavedTransport = crate::state::decode("virtio-mmio", data)?;
        let mut s = self.lock();
        let mismatch = |why: String| StateError::Mismatch {
            device: "virtio-mmio",
            why,
        };
        if saved.device_type != s.device.device_type() || saved.queues.len() != s.queues.len() {
            return Err(mismatch(format!(
                "device type {} with {} queues, not {} with {}",
                saved.device_type,
                saved.queues.len(),
                s.device.device_type(),
                s.queues.len()
            )));
        }
        if saved.driver_features & !Self::offered(&s) != 0 {
            return Err(mismatch("features this device does not offer".into()));
        }
        let started =
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        if saved.active
            && (saved.status & started != started
                || saved.driver_features & VIRTIO_F_VERSION_1 == 0)
        {
            return Err(mismatch(format!(
                "a started device with status {:#x} and features {:#x}",
                saved.status, saved.driver_features
            )));
        }
        self.reset(&mut s);
        for (q, sq) in s.queues.iter_mut().zip(&saved.queues) {
            if sq.size > q.max_size() || (sq.size != 0 && !sq.size.is_power_of_two()) {
                return Err(mismatch(format!("queue size {}", sq.size)));
            }
            q.set_size(sq.size);
            let (lo, hi) = split(sq.desc);
            q.set_desc_table_address(lo, hi);
            let (lo, hi) = split(sq.avail);
            q.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(sq.used);
            q.set_used_ring_address(lo, hi);
            q.set_ready(sq.ready);
        }
        s.device_features_sel = saved.device_features_sel;
        s.driver_features_sel = saved.driver_features_sel;
        s.driver_features = saved.driver_features;
        s.queue_sel = saved.queue_sel;
        s.config_generation = saved.config_generation;
        s.status = saved.status;
        if saved.active {
            self.activate_at(&mut s, true);
        }
        if saved.interrupt_status != 0 {
            self.interrupt.signal(saved.interrupt_status);
        }
        Ok(())
    }
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MmioTransport")
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: Interrupt) -> Self {
        let queues = fresh_queues(device.as_ref());
        Self {
            state: Mutex::new(State {
                device,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                queues,
                status: 0,
                config_generation: 0,
                active: false,
            }),
            mem,
            interrupt,
        }
    }

    /// The driver notified queue `index` (the register write, or its ioeventfd).
    pub fn queue_notify(&self, index: u32) {
        Self::notify(&mut self.lock(), index);
    }

    /// Runs queue `index` if the device is running and has it; anything else is ignored.
    fn notify(s: &mut State, index: u32) {
        if s.active && (index as usize) < s.queues.len() {
            s.device.process_queue(index as u16);
        }
    }

    /// Number of queues the device has.
    pub fn queue_count(&self) -> usize {
        self.lock().queues.len()
    }

    /// Offset of the queue-notify register, where ioeventfds are attached.
    pub const NOTIFY_OFFSET: u64 = 0x050;

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status_reg(&self.lock())
    }

    fn status_reg(&self, s: &State) -> u32 {
        if self.interrupt.has_failed() {
            s.status | status::NEEDS_RESET
        } else {
            s.status
        }
    }

    /// Where the driver and the device stand on each queue, read from the rings in guest
    /// memory, and the interrupt status: what `bulwark run` prints when a VM times out, to
    /// tell a guest that stopped offering work from a device that stopped serving it or an
    /// interrupt that was raised and never taken.
    pub fn rings(&self) -> RingsView {
        let s = self.lock();
        let queues = s
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .map(|(index, q)| {
                use vm_memory::Bytes;
                let size = u64::from(q.size());
                // The ring addresses are the driver's: anything, so the sums are checked.
                let at = |base: u64, off: u64| -> Option<u16> {
                    let addr = base.checked_add(off)?;
                    self.mem.read_obj(vm_memory::GuestAddress(addr)).ok()
                };
                QueueView {
                    index,
                    size: q.size(),
                    avail_idx: at(q.avail_ring(), 2),
                    used_idx: at(q.used_ring(), 2),
                    used_event: at(q.avail_ring(), 4 + 2 * size),
                    avail_event: at(q.used_ring(), 4 + 8 * size),
                }
            })
            .collect();
        RingsView {
            status: self.status_reg(&s),
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> std::sync::Arc<super::DeviceStats> {
        self.lock().device.stats()
    }

    /// One of the device's own host file descriptors is ready (from its worker thread).
    pub fn host_event(&self, token: u64, events: vmm_sys_util::epoll::EventSet) {
        self.lock().device.host_event(token, events);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offered(s: &State) -> u64 {
        s.device.features() | VIRTIO_F_VERSION_1
    }

    fn reset(&self, s: &mut State) {
        s.device.reset();
        s.queues = fresh_queues(s.device.as_ref());
        s.status = 0;
        s.driver_features = 0;
        s.device_features_sel = 0;
        s.driver_features_sel = 0;
        s.queue_sel = 0;
        s.active = false;
        self.interrupt.clear();
    }

    fn set_status(&self, s: &mut State, v: u32) {
        if v == 0 {
            self.reset(s);
            return;
        }
        let new = v & !s.status;
        // Bits may only be added, and only in the order the specification gives.
        if v & s.status != s.status {
            return;
        }
        let has = |bit| v & bit != 0;
        if new & status::DRIVER != 0 && !has(status::ACKNOWLEDGE) {
            return;
        }
        if new & status::FEATURES_OK != 0 {
            let ok = has(status::DRIVER)
                && s.driver_features & VIRTIO_F_VERSION_1 != 0
                && s.driver_features & !Self::offered(s) == 0;
            if !ok {
                // Leave FEATURES_OK clear: the driver sees the refusal when it reads back.
                s.status = v & !status::FEATURES_OK;
                return;
            }
        }
        if new & status::DRIVER_OK != 0 && !has(status::FEATURES_OK) {
            return;
        }
        s.status = v;
        if new & status::DRIVER_OK != 0 && !s.active {
            self.activate(s);
        }
    }

    fn activate(&self, s: &mut State) {
        self.activate_at(s, false);
    }

    /// Starts the device. `resume`: a restored device whose rings in guest memory are live;
    /// every queue continues at its used index (no device holds a chain between calls, so
    /// what was taken from a ring was also returned).
    fn activate_at(&self, s: &mut State, resume: bool) {
        let mut queues = Vec::new();
        for (i, q) in s.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                tracing::debug!(queue = i, "virtio queue invalid at DRIVER_OK");
                self.fail(s);
                return;
            }
            // The device gets its own copy; the transport keeps the registers' view.
            match Queue::try_from(q.state()) {
                Ok(mut copy) => {
                    if resume {
                        let Ok(used) =
                            copy.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                        else {
                            self.fail(s);
                            return;
                        };
                        copy.set_next_avail(used.0);
                        copy.set_next_used(used.0);
                    }
                    queues.push(copy)
                }
                Err(_) => {
                    self.fail(s);
                    return;
                }
            }
        }
        let features = s.driver_features;
        match s
            .device
            .activate(self.mem.clone(), features, queues, self.interrupt.clone())
        {
            Ok(()) => {
                s.active = true;
                if resume {
                    s.device.resumed();
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "virtio device refused to start");
                self.fail(s);
            }
        }
    }

    /// The transport and queue registers, for a snapshot. The device must be quiet (the
    /// caller holds every vCPU parked); the state lock keeps its worker out meanwhile.
    fn save(s: &State, interrupt: &Interrupt) -> SavedTransport {
        SavedTransport {
            device_type: s.device.device_type(),
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            driver_features: s.driver_features,
            queue_sel: s.queue_sel,
            status: s.status,
            config_generation: s.config_generation,
            active: s.active,
            interrupt_status: interrupt.status(),
            queues: s
                .queues
                .iter()
                .map(|q| SavedQueue {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                })
                .collect(),
        }
    }

    /// The device cannot go on: NEEDS_RESET and a configuration interrupt.
    fn fail(&self, s: &mut State) {
        s.status |= status::NEEDS_RESET;
        self.interrupt.signal(INT_CONFIG);
    }

    fn queue_setup_allowed(s: &State) -> bool {
        s.status & status::FEATURES_OK != 0 && s.status & status::DRIVER_OK == 0
    }

    fn read_reg(&self, s: &State, offset: u64) -> u32 {
        let q = s.queues.get(s.queue_sel as usize);
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => s.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match s.device_features_sel {
                0 => Self::offered(s) as u32,
                1 => (Self::offered(s) >> 32) as u32,
                _ => 0,
            },
            0x034 => q.map_or(0, |q| u32::from(q.max_size())),
            0x044 => q.map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            0x070 => self.status_reg(s),
            0x0fc => s.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&self, s: &mut State, offset: u64, v: u32) {
        let setup = Self::queue_setup_allowed(s);
        let sel = s.queue_sel as usize;
        match offset {
            0x014 => s.device_features_sel = v,
            0x020 if s.status & status::FEATURES_OK == 0 => match s.driver_features_sel {
                0 => s.driver_features = (s.driver_features & !0xffff_ffff) | u64::from(v),
                1 => s.driver_features = (s.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            0x024 => s.driver_features_sel = v,
            0x030 => s.queue_sel = v,
            Self::NOTIFY_OFFSET => Self::notify(s, v),
            0x070 => self.set_status(s, v),
            _ if setup => {
                let Some(q) = s.queues.get_mut(sel) else {
                    return;
                };
                match offset {
                    0x038 => q.set_size(v as u16),
                    0x044 => q.set_ready(v == 1),
                    0x080 => q.set_desc_table_address(Some(v), None),
                    0x084 => q.set_desc_table_address(None, Some(v)),
                    0x090 => q.set_avail_ring_address(Some(v), None),
                    0x094 => q.set_avail_ring_address(None, Some(v)),
                    0x0a0 => q.set_used_ring_address(Some(v), None),
                    0x0a4 => q.set_used_ring_address(None, Some(v)),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

impl crate::BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // The interrupt status is read in every interrupt handler: it needs no lock, so it
        // never waits for a device busy with a request.
        if offset == INTERRUPT_STATUS && data.len() == 4 {
            data.copy_from_slice(&self.interrupt.status().to_le_bytes());
            return;
        }
        let s = self.lock();
        if offset >= CONFIG_START {
            s.device.read_config(offset - CONFIG_START, data);
            return;
        }
        // Registers are 32-bit and aligned; anything else reads as zero.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(&s, offset).to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == INTERRUPT_ACK && data.len() == 4 {
            self.interrupt
                .ack(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            return;
        }
        let mut s = self.lock();
        if offset >= CONFIG_START {
            if s.status & status::DRIVER_OK == 0 || s.active {
                s.device.write_config(offset - CONFIG_START, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(&mut s, offset, v);
    }
}

/// A transport's queues as the rings in guest memory show them ([`MmioTransport::rings`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RingsView {
    /// The device status register.
    pub status: u32,
    /// The interrupt status register: bits raised and not yet acknowledged by the driver.
    pub interrupt_status: u32,
    /// The queues the driver set up.
    pub queues: Vec<QueueView>,
}

/// One queue's ring indices (`None`: not readable in guest memory).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueView {
    pub index: usize,
    pub size: u16,
    /// Buffers the driver made available (free-running).
    pub avail_idx: Option<u16>,
    /// Buffers the device returned (free-running).
    pub used_idx: Option<u16>,
    /// EVENT_IDX: the driver wants an interrupt when `used_idx` passes this.
    pub used_event: Option<u16>,
    /// EVENT_IDX: the device wants a notification when `avail_idx` passes this.
    pub avail_event: Option<u16>,
}

impl std::fmt::Display for RingsView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status={:#x} interrupt_status={:#x}",
            self.status, self.interrupt_status
        )?;
        let show = |v: Option<u16>| v.map_or("?".to_string(), |v| v.to_string());
        for q in &self.queues {
            write!(
                f,
                "; queue {}: avail={} used={}",
                q.index,
                show(q.avail_idx),
                show(q.used_idx)
            )?;
            if let (Some(a), Some(u)) = (q.avail_idx, q.used_idx) {
                write!(f, " (in device {})", a.wrapping_sub(u))?;
            }
            write!(
                f,
                " used_event={} avail_event={} size={}",
                show(q.used_event),
                show(q.avail_event),
                q.size
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use crate::virtio::rng::Rng;
    use crate::virtio::{INT_VRING, InterruptLine};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct Counter(AtomicU32);
    impl InterruptLine for Counter {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn rig() -> (MmioTransport, GuestMemoryMmap, Arc<Counter>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let line = Arc::new(Counter::default());
        let t = MmioTransport::new(
            Box::new(Rng::new()),
            mem.clone(),
            Interrupt::new(line.clone()),
        );
        (t, mem, line)
    }

    fn r(t: &MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    /// Negotiates features as Linux's virtio_mmio driver does: `high`/`low` feature words.
    fn negotiate(t: &MmioTransport, high: u32, low: u32) {
        w(t, 0x070, status::ACKNOWLEDGE);
        w(t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x024, 1);
        w(t, 0x020, high);
        w(t, 0x024, 0);
        w(t, 0x020, low);
        w(
            t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    /// Sets up queue 0 with 16 entries at `desc`, then starts the device.
    fn start_with_queue(t: &MmioTransport, desc: u32) {
        w(t, 0x030, 0);
        w(t, 0x038, 16);
        w(t, 0x080, desc);
        w(t, 0x090, 0x2000);
        w(t, 0x0a0, 0x3000);
        w(t, 0x044, 1);
        w(t, 0x070, ALL_OK);
    }

    /// VERSION_1 only; rings at 0x1000 / 0x2000 / 0x3000.
    fn bring_up(t: &MmioTransport) {
        negotiate(t, 1, 0);
        start_with_queue(t, 0x1000);
    }

    #[test]
    fn mmio_identifies_device_and_offers_version_1() {
        let (t, _, _) = rig();
        assert_eq!((r(&t, 0), r(&t, 4), r(&t, 8)), (MAGIC, VERSION, 4));
        w(&t, 0x014, 1);
        assert_eq!(r(&t, 0x010) & 1, 1, "VERSION_1 in the high word");
        assert_eq!(r(&t, 0x034), 256, "queue max size");
        let mut b = [0u8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0], "narrow register reads are zero");
    }

    #[test]
    fn mmio_refuses_features_without_version_1_or_unoffered() {
        let (t, _, _) = rig();
        w(&t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        w(
            &t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&t, 0x070) & status::FEATURES_OK,
            0,
            "legacy driver refused"
        );
        w(&t, 0x024, 1);
        w(&t, 0x020, 1 | (1 << 5)); // VERSION_1 and an unoffered bit
        w(
            &t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&t, 0x070) & status::FEATURES_OK,
            0,
            "unoffered feature refused"
        );
        // DRIVER_OK without FEATURES_OK is ignored.
        w(
            &t,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(r(&t, 0x070) & status::DRIVER_OK, 0);
    }

    #[test]
    fn mmio_rng_fills_guest_buffer_and_interrupts() {
        let (t, mem, line) = rig();
        bring_up(&t);
        assert_eq!(r(&t, 0x070) & status::NEEDS_RESET, 0);
        // One writable descriptor of 64 bytes at 0x8000, offered in the avail ring.
        mem.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(64u32, GuestAddress(0x1008)).unwrap();
        mem.write_obj(2u16, GuestAddress(0x100c)).unwrap(); // VRING_DESC_F_WRITE
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // ring[0] = descriptor 0
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap(); // avail idx = 1
        w(&t, 0x050, 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(0x3002)).unwrap();
        let used_len: u32 = mem.read_obj(GuestAddress(0x3008)).unwrap();
        assert_eq!((used_idx, used_len), (1, 64));
        let mut data = [0u8; 64];
        mem.read_slice(&mut data, GuestAddress(0x8000)).unwrap();
        assert!(
            data.iter().filter(|&&b| b == 0).count() < 16,
            "random bytes written"
        );
        assert_eq!(r(&t, 0x060) & INT_VRING, INT_VRING);
        assert!(line.0.load(Ordering::Relaxed) >= 1);
        w(&t, 0x064, INT_VRING);
        assert_eq!(r(&t, 0x060), 0, "acknowledged");
    }

    #[test]
    fn mmio_rng_with_event_idx_publishes_avail_event() {
        let (t, mem, _) = rig();
        // Negotiate EVENT_IDX (bit 29) as well as VERSION_1.
        negotiate(&t, 1, 1 << 29);
        start_with_queue(&t, 0x1000);
        for (n, desc) in [(1u16, 0u16), (2, 1)] {
            let d = 0x1000 + u64::from(desc) * 16;
            mem.write_obj(0x8000u64 + u64::from(desc) * 0x100, GuestAddress(d))
                .unwrap();
            mem.write_obj(32u32, GuestAddress(d + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(d + 12)).unwrap();
            mem.write_obj(desc, GuestAddress(0x2004 + 2 * u64::from(n - 1)))
                .unwrap();
            mem.write_obj(n, GuestAddress(0x2002)).unwrap();
            w(&t, 0x050, 0);
            let used_idx: u16 = mem.read_obj(GuestAddress(0x3002)).unwrap();
            assert_eq!(used_idx, n, "request {n} served");
            // avail_event sits after the 16 used elements: the driver must notify for the next.
            let avail_event: u16 = mem.read_obj(GuestAddress(0x3004 + 16 * 8)).unwrap();
            assert_eq!(
                avail_event, n,
                "device asks to be notified at avail index {n}"
            );
        }
    }

    #[test]
    fn rings_show_what_the_driver_offered_and_the_device_returned() {
        let (t, mem, _) = rig();
        negotiate(&t, 1, 1 << 29);
        start_with_queue(&t, 0x1000);
        // Two buffers offered, the device notified of one: it serves both (it drains the ring).
        for desc in 0u16..2 {
            let d = 0x1000 + u64::from(desc) * 16;
            mem.write_obj(0x8000u64 + u64::from(desc) * 0x100, GuestAddress(d))
                .unwrap();
            mem.write_obj(32u32, GuestAddress(d + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(d + 12)).unwrap();
            mem.write_obj(desc, GuestAddress(0x2004 + 2 * u64::from(desc)))
                .unwrap();
        }
        mem.write_obj(1u16, GuestAddress(0x2004 + 2 * 16)).unwrap(); // used_event: interrupt
        mem.write_obj(2u16, GuestAddress(0x2002)).unwrap();
        w(&t, 0x050, 0);
        // A third offered without a notification: the device has not seen it.
        mem.write_obj(3u16, GuestAddress(0x2002)).unwrap();
        let v = t.rings();
        assert_eq!(v.queues.len(), 1);
        let q = &v.queues[0];
        assert_eq!(
            (q.avail_idx, q.used_idx, q.used_event, q.avail_event),
            (Some(3), Some(2), Some(1), Some(2))
        );
        assert_eq!(
            v.interrupt_status & INT_VRING,
            INT_VRING,
            "raised, not acked"
        );
        let shown = v.to_string();
        assert!(
            shown.contains("queue 0: avail=3 used=2 (in device 1) used_event=1 avail_event=2"),
            "{shown}"
        );
        // Ring addresses at the top of the address space: unreadable, not an overflow.
        let (t, _, _) = rig();
        negotiate(&t, 1, 0);
        w(&t, 0x030, 0);
        w(&t, 0x038, 16);
        for reg in [0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4] {
            w(&t, reg, u32::MAX);
        }
        w(&t, 0x044, 1);
        let v = t.rings();
        assert!(
            v.queues
                .iter()
                .all(|q| q.avail_idx.is_none() && q.avail_event.is_none())
        );
        assert!(v.to_string().contains("avail=? used=?"), "{v}");
    }

    /// Found by fuzzing: an avail index far ahead of anything the queue can hold made the
    /// device drain nothing and re-check forever, wedging the vCPU thread.
    #[test]
    fn mmio_rng_broken_avail_index_does_not_spin() {
        let (t, mem, _) = rig();
        bring_up(&t);
        mem.write_obj(0x8000u16, GuestAddress(0x2002)).unwrap(); // avail idx 32768
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let t = Arc::new(t);
        let t2 = t.clone();
        std::thread::spawn(move || {
            w(&t2, 0x050, 0);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .is_ok(),
            "queue notification with a broken avail ring never returned"
        );
        // The device is still usable from the host side.
        t.queue_notify(0);
    }

    #[test]
    fn mmio_queue_outside_memory_sets_needs_reset() {
        let (t, _, line) = rig();
        negotiate(&t, 1, 0);
        start_with_queue(&t, 0xffff_f000); // far outside 1 MiB
        assert_ne!(r(&t, 0x070) & status::NEEDS_RESET, 0);
        assert_eq!(r(&t, 0x060) & INT_CONFIG, INT_CONFIG);
        assert!(line.0.load(Ordering::Relaxed) >= 1);
        // Notifications on a device that never started are ignored; a reset recovers it.
        w(&t, 0x050, 0);
        w(&t, 0x070, 0);
        assert_eq!(r(&t, 0x070), 0);
        bring_up(&t);
        assert_eq!(r(&t, 0x070) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn mmio_queue_registers_frozen_after_driver_ok_and_notify_out_of_range_ignored() {
        let (t, _, _) = rig();
        bring_up(&t);
        w(&t, 0x038, 4); // too late
        w(&t, 0x030, 7); // no such queue
        assert_eq!(r(&t, 0x034), 0);
        w(&t, 0x050, 99);
        w(&t, 0x050, u32::MAX);
        w(&t, 0x030, 0);
        assert_eq!(r(&t, 0x044), 1);
    }
}
