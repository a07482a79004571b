//! BPF_MAP_LOOKUP_BATCH (Linux 5.6): a whole hash map's entries in a few system calls.
//! aya 0.14 has no batch operations; its iteration costs two system calls per entry
//! (next key, lookup), and one lookup per flow per second is what the flow table's tick
//! cost with thousands of flows.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

/// `enum bpf_cmd` in linux/bpf.h.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads a hash map (keys `K`, values `V`, of the map's own sizes) `chunk` entries at a
/// time, into buffers kept from one read to the next: a tick that reads 100,000 flows
/// each time does not fault fresh pages in each time.
pub struct BatchReader<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
}

impl<K: Pod, V: Pod> BatchReader<K, V> {
    pub fn new(chunk: usize) -> BatchReader<K, V> {
        let chunk = chunk.max(1);
        // SAFETY: Pod types are plain data for which all-zero bytes are a value.
        let (key, value): (K, V) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        BatchReader {
            keys: vec![key; chunk],
            values: vec![value; chunk],
        }
    }

    /// Calls `each` with every entry of the hash map `fd`. Entries added or removed meanwhile
    /// may or may not be seen; values are copied bucket by bucket under the bucket's lock.
    pub fn read_all(&mut self, fd: BorrowedFd<'_>, mut each: impl FnMut(&K, &V)) -> io::Result<()> {
        // The kernel's position in the map (a bucket index for hash maps): opaque, written by
        // each call, given back to the next.
        let mut position = 0u64;
        let mut next_position = 0u64;
        let mut first = true;
        loop {
            let chunk = self.keys.len();
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &position as *const u64 as u64
                },
                out_batch: &mut next_position as *mut u64 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: attr points at buffers of `count` keys and values of the map's sizes
            // (the callers' types are the map's, as aya checked when it opened it), and at
            // the two position words; all outlive the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            let error = (rc < 0).then(io::Error::last_os_error);
            let filled = (attr.count as usize).min(chunk);
            for (key, value) in self.keys[..filled].iter().zip(&self.values[..filled]) {
                each(key, value);
            }
            match error.as_ref().and_then(io::Error::raw_os_error) {
                None => {
                    position = next_position;
                    first = false;
                }
                // The end of the map.
                Some(libc::ENOENT) => return Ok(()),
                // One bucket holds more entries than the buffers: larger ones, same position.
                Some(libc::ENOSPC) if chunk < 1 << 20 => {
                    self.keys.resize(chunk * 2, self.keys[0]);
                    self.values.resize(chunk * 2, self.values[0]);
                }
                Some(_) => return Err(error.expect("an error")),
            }
        }
    }
}
