//! A thin AF_XDP layer over libc: one socket bound to an interface's receive queue, with a
//! UMEM of its own (fixed 2 KiB frames), its fill and completion rings and its RX and TX
//! rings, all shared with the kernel through mmap (Documentation/networking/af_xdp.rst).
//!
//! Each socket owns its UMEM: a packet is rewritten and sent in place when it leaves by the
//! interface it came in on, and copied into a frame of the other socket's UMEM otherwise (a
//! copy of a media packet is a few tens of nanoseconds; one UMEM shared across devices would
//! need a fill and completion ring per device and frames moving between them).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use libc::{c_void, xdp_desc};

/// Bytes per UMEM frame: a whole Ethernet frame with the kernel's headroom and room to grow.
pub const FRAME_SIZE: u32 = 2048;
/// Frames per UMEM: half in the fill ring, half kept for copies and transmission.
const FRAMES: u32 = 8192;
/// Entries of each ring (a power of two).
const RING_SIZE: u32 = 4096;
/// Frames kept out of the fill ring for packets copied in from another socket.
const COPY_RESERVE: usize = 512;

/// An mmap'd region, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize, fd: Option<(RawFd, u64)>) -> io::Result<Mapping> {
        let (flags, fd, offset) = match fd {
            Some((fd, offset)) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd, offset),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            ),
        };
        // SAFETY: a fresh mapping; the kernel checks every argument.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the region this Mapping mapped, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One of the four rings: a producer and a consumer index in shared memory, then the
/// entries. This side produces into the fill and TX rings and consumes the RX and
/// completion rings.
struct Ring<T> {
    /// The shared memory the pointers below point into, unmapped with the ring.
    _map: Mapping,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    entries: *mut T,
    /// This side's own index (producer or consumer), ahead of shared memory until commit.
    local: u32,
}

impl<T: Copy> Ring<T> {
    fn map(fd: RawFd, offsets: &libc::xdp_ring_offset, page_offset: u64) -> io::Result<Ring<T>> {
        let len = offsets.desc as usize + RING_SIZE as usize * size_of::<T>();
        let map = Mapping::new(len, Some((fd, page_offset)))?;
        let at = |offset: u64| map.ptr.as_ptr().wrapping_add(offset as usize);
        let (producer, consumer, flags, entries) = (
            at(offsets.producer).cast::<AtomicU32>(),
            at(offsets.consumer).cast::<AtomicU32>(),
            at(offsets.flags).cast::<AtomicU32>(),
            at(offsets.desc).cast::<T>(),
        );
        Ok(Ring {
            _map: map,
            producer,
            consumer,
            flags,
            entries,
            local: 0,
        })
    }

    fn shared(&self, index: *const AtomicU32) -> u32 {
        // SAFETY: the index lies in this ring's mapping, aligned by the kernel.
        unsafe { (*index).load(Ordering::Acquire) }
    }

    fn entry(&self, position: u32) -> *mut T {
        self.entries
            .wrapping_add((position & (RING_SIZE - 1)) as usize)
    }

    /// Producer side: entries that can be written now.
    fn free(&self) -> u32 {
        RING_SIZE - self.local.wrapping_sub(self.shared(self.consumer))
    }

    /// Producer side: writes one entry (after `free` said there is room).
    fn push(&mut self, value: T) {
        // SAFETY: the entry is in the ring and the kernel does not read it before commit.
        unsafe { self.entry(self.local).write(value) };
        self.local = self.local.wrapping_add(1);
    }

    /// Producer side: hands what was pushed to the kernel.
    fn commit(&self) {
        // SAFETY: as in `shared`.
        unsafe { (*self.producer).store(self.local, Ordering::Release) };
    }

    /// Consumer side: entries the kernel has produced and this side not yet read.
    fn ready(&self) -> u32 {
        self.shared(self.producer).wrapping_sub(self.local)
    }

    /// Consumer side: the next ready entry, consumed.
    fn pop(&mut self) -> T {
        // SAFETY: called only for entries `ready` counted, which the kernel wrote.
        let value = unsafe { self.entry(self.local).read() };
        self.local = self.local.wrapping_add(1);
        value
    }

    /// Consumer side: gives the popped entries back to the kernel.
    fn release(&self) {
        // SAFETY: as in `shared`.
        unsafe { (*self.consumer).store(self.local, Ordering::Release) };
    }

    /// Producer side: entries committed that the kernel has not taken yet.
    fn unconsumed(&self) -> u32 {
        self.local.wrapping_sub(self.shared(self.consumer))
    }

    fn needs_wakeup(&self) -> bool {
        self.shared(self.flags) & libc::XDP_RING_NEED_WAKEUP != 0
    }
}

/// What one socket counted since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketCounters {
    /// Packets the kernel dropped for want of a fill ring frame or RX ring room.
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty: u64,
    pub tx_invalid: u64,
}

/// An AF_XDP socket on one interface queue with its own UMEM.
pub struct XskSocket {
    fd: OwnedFd,
    umem: Mapping,
    fill: Ring<u64>,
    completion: Ring<u64>,
    rx: Ring<xdp_desc>,
    tx: Ring<xdp_desc>,
    /// Frames (their start addresses) in no ring.
    free: Vec<u64>,
    /// TX entries pushed since the last kick.
    unsent: bool,
    pub ifindex: u32,
    pub queue: u32,
    /// Whether the driver gave zero-copy (else the kernel copies each packet: veth, generic).
    pub zero_copy: bool,
}

fn setsockopt<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            name,
            (value as *const T).cast::<c_void>(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an option into a C struct made of integers (all zeros is a valid one).
fn getsockopt<T>(fd: RawFd, name: libc::c_int) -> io::Result<T> {
    // SAFETY: only used with libc's integer-only structs, for which zeros are valid.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: value has room for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            name,
            (&raw mut value).cast::<c_void>(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl XskSocket {
    /// Opens a socket on `ifindex`'s receive queue `queue`: zero-copy when the driver can,
    /// copy mode otherwise.
    pub fn open(ifindex: u32, queue: u32) -> io::Result<XskSocket> {
        // SAFETY: plain socket creation; the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem = Mapping::new((FRAMES * FRAME_SIZE) as usize, None)?;
        let registration = libc::xdp_umem_reg {
            addr: umem.ptr.as_ptr() as u64,
            len: umem.len as u64,
            chunk_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, libc::XDP_UMEM_REG, &registration)?;
        for ring in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            setsockopt(raw, ring, &RING_SIZE)?;
        }
        let offsets: libc::xdp_mmap_offsets = getsockopt(raw, libc::XDP_MMAP_OFFSETS)?;
        let fill = Ring::map(raw, &offsets.fr, libc::XDP_UMEM_PGOFF_FILL_RING)?;
        let completion = Ring::map(raw, &offsets.cr, libc::XDP_UMEM_PGOFF_COMPLETION_RING)?;
        let rx = Ring::map(raw, &offsets.rx, libc::XDP_PGOFF_RX_RING as u64)?;
        let tx = Ring::map(raw, &offsets.tx, libc::XDP_PGOFF_TX_RING as u64)?;
        let mut socket = XskSocket {
            fd,
            umem,
            fill,
            completion,
            rx,
            tx,
            free: (0..u64::from(FRAMES))
                .map(|frame| frame * u64::from(FRAME_SIZE))
                .collect(),
            unsent: false,
            ifindex,
            queue,
            zero_copy: false,
        };
        socket.refill();
        let address = |flags: u16| libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: flags | libc::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        let bind = |address: libc::sockaddr_xdp| {
            // SAFETY: address is a valid sockaddr_xdp of the size passed.
            let rc = unsafe {
                libc::bind(
                    raw,
                    (&raw const address).cast::<libc::sockaddr>(),
                    size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // No mode flag: zero-copy where the driver has it, else copy.
        bind(address(0)).or_else(|_| bind(address(libc::XDP_COPY)))?;
        let options: libc::xdp_options = getsockopt(raw, libc::XDP_OPTIONS)?;
        socket.zero_copy = options.flags & libc::XDP_OPTIONS_ZEROCOPY != 0;
        Ok(socket)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Moves free frames into the fill ring, keeping some back for copies.
    pub fn refill(&mut self) {
        let room = self.fill.free() as usize;
        let spare = self.free.len().saturating_sub(COPY_RESERVE);
        let n = room.min(spare);
        if n == 0 {
            return;
        }
        for address in self.free.drain(self.free.len() - n..) {
            self.fill.push(address);
        }
        self.fill.commit();
    }

    /// Takes frames whose transmission completed back.
    pub fn reap(&mut self) {
        let ready = self.completion.ready();
        for _ in 0..ready {
            let address = self.completion.pop();
            self.free.push(frame_of(address));
        }
        if ready > 0 {
            self.completion.release();
        }
    }

    /// Received packets ready to be read, at most `max`.
    pub fn received(&self, max: u32) -> u32 {
        self.rx.ready().min(max)
    }

    /// The next received packet: its address in the UMEM and its length. The frame is the
    /// caller's until it hands it to [`XskSocket::send`] or [`XskSocket::recycle`].
    pub fn next_received(&mut self) -> (u64, usize) {
        let desc = self.rx.pop();
        (desc.addr, desc.len as usize)
    }

    /// Gives the RX entries read with `next_received` back to the kernel.
    pub fn release_received(&self) {
        self.rx.release();
    }

    /// The frame holding `address`, whole, and where `address` lies in it.
    pub fn frame_mut(&mut self, address: u64) -> (&mut [u8], usize) {
        let start = frame_of(address);
        // SAFETY: addresses come from this UMEM's rings or free list, so the frame lies
        // within the mapping; the caller owns the frame while it holds it.
        let frame = unsafe {
            std::slice::from_raw_parts_mut(
                self.umem.ptr.as_ptr().add(start as usize),
                FRAME_SIZE as usize,
            )
        };
        (frame, (address - start) as usize)
    }

    /// A free frame to copy a packet into, when there is one.
    pub fn take_frame(&mut self) -> Option<u64> {
        self.free.pop()
    }

    /// Returns a frame that goes nowhere.
    pub fn recycle(&mut self, address: u64) {
        self.free.push(frame_of(address));
    }

    /// Queues `len` bytes at `address` for transmission; false (and the frame recycled)
    /// when the TX ring is full.
    pub fn send(&mut self, address: u64, len: usize) -> bool {
        if self.tx.free() == 0 {
            self.recycle(address);
            return false;
        }
        self.tx.push(xdp_desc {
            addr: address,
            len: len as u32,
            options: 0,
        });
        self.unsent = true;
        true
    }

    /// Hands the queued packets to the kernel and wakes it when it sleeps. In copy mode the
    /// transmission runs in the kick, at most 32 packets each (the kernel's TX batch), so it
    /// kicks until the ring is drained or the device pushes back. Whether packets are left
    /// in the ring (the next flush goes on with them).
    pub fn flush(&mut self) -> io::Result<bool> {
        if !self.unsent {
            return Ok(false);
        }
        self.tx.commit();
        for _ in 0..RING_SIZE / 32 + 1 {
            if self.tx.unconsumed() == 0 || !self.tx.needs_wakeup() {
                break;
            }
            // SAFETY: a send of nothing on our own socket: the kernel's TX kick.
            let rc = unsafe {
                libc::sendto(
                    self.raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc >= 0 {
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // A full batch sent, more to go.
                Some(libc::EAGAIN) => continue,
                // The device pushes back: the entries stay for the next flush.
                Some(libc::EBUSY | libc::ENOBUFS | libc::ENETDOWN) => break,
                _ => return Err(err),
            }
        }
        self.unsent = self.tx.unconsumed() > 0;
        Ok(self.unsent)
    }

    pub fn counters(&self) -> SocketCounters {
        match getsockopt::<libc::xdp_statistics>(self.raw_fd(), libc::XDP_STATISTICS) {
            Ok(stats) => SocketCounters {
                rx_dropped: stats.rx_dropped,
                rx_ring_full: stats.rx_ring_full,
                rx_fill_ring_empty: stats.rx_fill_ring_empty_descs,
                tx_invalid: stats.tx_invalid_descs,
            },
            Err(_) => SocketCounters::default(),
        }
    }
}

/// The start of the frame `address` lies in (frames are aligned to their size).
fn frame_of(address: u64) -> u64 {
    address & !u64::from(FRAME_SIZE - 1)
}

// SAFETY: the raw pointers point into mappings the socket owns; the kernel is the only
// other party, and it synchronises through the rings' atomic indices.
unsafe impl Send for XskSocket {}
