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

/// Every entry of the hash map `fd` (keys `K`, values `V`, of the map's own sizes), read
/// `chunk` at a time. Entries added or removed meanwhile may or may not be in the result;
/// values are copied bucket by bucket under the bucket's lock.
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>, chunk: usize) -> io::Result<Vec<(K, V)>> {
    let mut chunk = chunk.max(1);
    // SAFETY: Pod types are plain data for which all-zero bytes are a value.
    let zero_key: K = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let zero_value: V = unsafe { std::mem::zeroed() };
    let mut keys = vec![zero_key; chunk];
    let mut values = vec![zero_value; chunk];
    let mut entries = Vec::new();
    // The kernel's position in the map (a bucket index for hash maps): opaque, written by
    // each call, given back to the next.
    let mut position = 0u64;
    let mut next_position = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &position as *const u64 as u64
            },
            out_batch: &mut next_position as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values of the map's sizes
        // (the callers' types are the map's, as aya checked when it opened it), and at the
        // two position words; all outlive the call.
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
        entries.extend(
            keys[..filled]
                .iter()
                .copied()
                .zip(values[..filled].iter().copied()),
        );
        match error.as_ref().and_then(io::Error::raw_os_error) {
            None => {
                position = next_position;
                first = false;
            }
            // The end of the map.
            Some(libc::ENOENT) => return Ok(entries),
            // One bucket holds more entries than the buffers: larger ones, same position.
            Some(libc::ENOSPC) if chunk < 1 << 20 => {
                chunk *= 2;
                keys.resize(chunk, zero_key);
                values.resize(chunk, zero_value);
            }
            Some(_) => return Err(error.expect("an error")),
        }
    }
}
