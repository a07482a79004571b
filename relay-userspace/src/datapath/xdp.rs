//! The XDP datapath: loads the embedded program, pins its maps, attaches it to the configured
//! interfaces (native first, generic as fallback) and installs flows into the kernel map.
//! Packets the program passes up for a flow (no neighbour entry yet, ...) are relayed by the
//! userspace socket path, so the first packet of a flow is never lost.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, XskMap},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use relay_common::{
    EGRESS_MAP, FLOWS_MAP, FlowCounters as KernelCounters, FlowKey, FlowValue, NextHopCache,
    STATS_MAP, StatCounter, VLANS_MAP, Verdict, VlanDevice, XDP_PASS_PROGRAM, XDP_RELAY_PROGRAM,
    XSK_INDEX_MAP, XSK_QUEUES_PER_INTERFACE, XSKS_MAP,
};
use tokio::runtime::Handle;

use super::{
    Datapath, DatapathError, DatapathKind, DatapathStats, DatapathStatus, FlowCounters, FlowSpec,
    InterfaceStatus, SlowPath, VerdictCount, batch::BatchReader, userspace::SocketForwarder,
    worker::Workers,
};
use crate::{
    datapath::config::{DatapathConfig, TranscryptPath, XdpModeChoice},
    paths,
    time::monotonic_ns,
};

/// The XDP program, built by build.rs from relay-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay"));

/// What the kernel counted of a flow, as the flow table reports it.
fn of_kernel(counters: &KernelCounters) -> FlowCounters {
    FlowCounters {
        xdp_packets: counters.packets,
        xdp_bytes: counters.bytes,
        last_seen_ns: counters.last_seen_ns,
        ..FlowCounters::default()
    }
}

/// Flow map entries read per batch lookup.
const BATCH_CHUNK: usize = 4096;

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The loaded program and its maps. Loading does not attach; tests drive it through
/// BPF_PROG_TEST_RUN with the same flow operations relayd uses.
pub struct KernelProgram {
    ebpf: Ebpf,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    /// The flow map's descriptor again, for batch lookups (aya keeps its own private).
    flows_fd: OwnedFd,
    batch: BatchReader<FlowKey, FlowValue>,
    /// Entries the last batch read found: the next one's starting capacity.
    flows_len_hint: usize,
    stats: PerCpuArray<MapData, StatCounter>,
    egress: DevMapHash<MapData>,
    vlans: HashMap<MapData, u32, VlanDevice>,
    xsks: XskMap<MapData>,
    xsk_index: HashMap<MapData, u32, u32>,
    capacity: u32,
    pin_dir: PathBuf,
}

impl KernelProgram {
    /// Loads the program with its maps pinned in `pin_dir` (reusing maps already pinned there,
    /// so flows survive a restart) and checks every map (katran `initialSanityChecking`).
    pub fn load(pin_dir: &Path, capacity: u32) -> anyhow::Result<KernelProgram> {
        ensure_bpffs()?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        renew_stats_pin_of_other_size(pin_dir);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(FLOWS_MAP, capacity)
            .load(EBPF_OBJECT)
            .context("loading the XDP program (needs CAP_BPF and CAP_NET_ADMIN)")?;
        for name in [XDP_RELAY_PROGRAM, XDP_PASS_PROGRAM] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        let mismatch = |name: &str| {
            format!(
                "map {name} (pinned in {}) does not match this relayd's layout; stop relayd and remove that directory to reset the flow table",
                pin_dir.display()
            )
        };
        let flows_map = take_map(&mut ebpf, FLOWS_MAP)?;
        let pinned_capacity = map_data(&flows_map)?.info()?.max_entries();
        let flows_fd = map_data(&flows_map)?
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the flow map's descriptor")?;
        let flows = HashMap::try_from(flows_map).with_context(|| mismatch(FLOWS_MAP))?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, STATS_MAP)?)
            .with_context(|| mismatch(STATS_MAP))?;
        let egress = DevMapHash::try_from(take_map(&mut ebpf, EGRESS_MAP)?)
            .with_context(|| mismatch(EGRESS_MAP))?;
        let vlans = HashMap::try_from(take_map(&mut ebpf, VLANS_MAP)?)
            .with_context(|| mismatch(VLANS_MAP))?;
        let xsks = XskMap::try_from(take_map(&mut ebpf, XSKS_MAP)?)?;
        let xsk_index = HashMap::try_from(take_map(&mut ebpf, XSK_INDEX_MAP)?)?;
        if pinned_capacity != capacity {
            tracing::warn!(
                pinned_capacity,
                configured = capacity,
                "the flow map pinned in {} keeps its capacity; remove it while relayd is stopped to apply datapath.capacity",
                pin_dir.display()
            );
        }
        Ok(KernelProgram {
            ebpf,
            flows,
            flows_fd,
            batch: BatchReader::new(BATCH_CHUNK),
            flows_len_hint: 0,
            stats,
            egress,
            vlans,
            xsks,
            xsk_index,
            capacity: pinned_capacity,
            pin_dir: pin_dir.to_owned(),
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn program_mut(&mut self, name: &str) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Lets the program forward between `interfaces` (name, ifindex): puts them in the egress
    /// devmap, registers the VLAN devices on them, and turns on forwarding on `lo` for the
    /// fib lookups. Works in the calling thread's network namespace.
    pub fn prepare_forwarding(&mut self, interfaces: &[(String, u32)]) -> anyhow::Result<()> {
        enable_loopback_forwarding()?;
        for (name, ifindex) in interfaces {
            self.egress
                .insert(*ifindex, *ifindex, None, 0)
                .with_context(|| format!("adding {name} to the egress devmap"))?;
            for vlan in vlan_devices_on(name)? {
                self.register_vlan_device(vlan.ifindex, *ifindex, vlan.vlan_id)
                    .with_context(|| format!("registering VLAN device {}", vlan.name))?;
                tracing::info!(vlan = %vlan.name, vlan_id = vlan.vlan_id, parent = %name, "XDP: VLAN egress via parent");
            }
        }
        Ok(())
    }

    /// Starts the transcryption workers on `interfaces` (name, ifindex) and lets the
    /// program steer to their sockets.
    pub fn start_workers(&mut self, interfaces: &[(String, u32)]) -> anyhow::Result<Workers> {
        let mut listed = Vec::new();
        for (slot, (name, ifindex)) in interfaces.iter().enumerate() {
            let first = slot as u32 * XSK_QUEUES_PER_INTERFACE;
            listed.push((name.clone(), *ifindex, first));
        }
        let xsks = &mut self.xsks;
        let workers = Workers::start(&listed, |(index, fd)| {
            xsks.set(index, fd, 0).map_err(io::Error::other)
        })?;
        for (name, ifindex, first) in &listed {
            self.xsk_index
                .insert(ifindex, first, 0)
                .with_context(|| format!("registering {name}'s worker sockets"))?;
        }
        Ok(workers)
    }

    /// Tells the program that a fib lookup answering `ifindex` means "send on
    /// `parent_ifindex` tagged with `vlan_id`".
    pub fn register_vlan_device(
        &mut self,
        ifindex: u32,
        parent_ifindex: u32,
        vlan_id: u16,
    ) -> anyhow::Result<()> {
        let device = VlanDevice {
            parent_ifindex,
            vlan_id,
            _pad: [0; 2],
        };
        Ok(self.vlans.insert(ifindex, device, 0)?)
    }

    /// Installs or replaces a flow; an existing entry keeps its counters.
    pub fn install(
        &mut self,
        id: u32,
        generation: u32,
        spec: &FlowSpec,
    ) -> Result<(), DatapathError> {
        let key = spec.key();
        let action = spec.action(id, generation);
        let counters = match self.flows.get(&key, 0) {
            // Adopting a pinned flow as it is: nothing to write. Writing would race with
            // the program's counter increments and lose the packets counted in between.
            Ok(existing) if existing.action == action => return Ok(()),
            Ok(existing) => existing.counters,
            Err(_) => KernelCounters {
                last_seen_ns: monotonic_ns(),
                ..KernelCounters::default()
            },
        };
        // A replaced flow may go elsewhere: its next hop is resolved afresh.
        let value = FlowValue {
            action,
            counters,
            next_hop: NextHopCache::default(),
        };
        self.flows
            .insert(key, value, 0)
            .map_err(|err| DatapathError::Map(format!("inserting flow {id}: {err}")))
    }

    pub fn remove(&mut self, spec: &FlowSpec) {
        match self.flows.remove(&spec.key()) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(err) => tracing::error!(?spec, %err, "removing a flow from the kernel map failed"),
        }
    }

    pub fn counters(&self, spec: &FlowSpec) -> FlowCounters {
        match self.flows.get(&spec.key(), 0) {
            Ok(value) => of_kernel(&value.counters),
            Err(_) => FlowCounters::default(),
        }
    }

    /// Every flow's counters in a few system calls (batch lookups): `(id, key, counters)`
    /// in increasing id order (two entries may share an id for a moment while a flow
    /// changes key).
    pub fn counters_by_id(&mut self) -> io::Result<Vec<(u32, FlowKey, FlowCounters)>> {
        let mut read = Vec::with_capacity(self.flows_len_hint);
        self.batch.read_all(self.flows_fd.as_fd(), |key, value| {
            read.push((value.action.flow_id, *key, of_kernel(&value.counters)))
        })?;
        self.flows_len_hint = read.len();
        // Sorting (id, index) pairs and gathering once moves far fewer bytes than sorting
        // the entries themselves.
        let mut order: Vec<(u32, u32)> = read
            .iter()
            .enumerate()
            .map(|(index, (id, _, _))| (*id, index as u32))
            .collect();
        order.sort_unstable();
        Ok(order
            .into_iter()
            .map(|(_, index)| read[index as usize])
            .collect())
    }

    /// Counters by verdict, summed over CPUs, in [`Verdict::ALL`] order.
    pub fn verdicts(&self) -> Vec<VerdictCount> {
        Verdict::ALL
            .iter()
            .map(|verdict| {
                let (packets, bytes) = match self.stats.get(&(*verdict as u32), 0) {
                    Ok(per_cpu) => per_cpu
                        .iter()
                        .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes)),
                    Err(_) => (0, 0),
                };
                VerdictCount {
                    verdict: verdict.name().to_owned(),
                    packets,
                    bytes,
                }
            })
            .collect()
    }

    /// Flows present in the (pinned) map: `(id, generation, spec)`.
    pub fn installed(&self) -> Vec<(u32, u32, FlowSpec)> {
        self.flows
            .iter()
            .filter_map(Result::ok)
            .map(|(key, value)| {
                (
                    value.action.flow_id,
                    value.action.generation,
                    FlowSpec::from_kernel(&key, &value.action),
                )
            })
            .collect()
    }
}

pub struct XdpDatapath {
    /// Dropped first: the workers' sockets leave the program's map as they close.
    workers: Option<Workers>,
    workers_reason: Option<String>,
    kernel: Mutex<KernelProgram>,
    interfaces: Vec<InterfaceStatus>,
    slow_path: SocketForwarder,
}

impl XdpDatapath {
    pub fn open(config: &DatapathConfig, runtime: Handle) -> anyhow::Result<XdpDatapath> {
        if config.interfaces.is_empty() {
            bail!("no interfaces configured (datapath.interfaces is empty)");
        }
        let interfaces: Vec<(String, u32)> = config
            .interfaces
            .iter()
            .map(|name| Ok((name.clone(), ifindex(name)?)))
            .collect::<anyhow::Result<_>>()?;
        let mut kernel = KernelProgram::load(&config.pin_dir, config.capacity)?;
        kernel.prepare_forwarding(&interfaces)?;
        detach_stale_links(&config.pin_dir, &interfaces)?;
        let mut attached = Vec::new();
        let program = kernel.program_mut(XDP_RELAY_PROGRAM)?;
        for (name, ifindex) in interfaces.clone() {
            let link_pin = config.pin_dir.join(format!("{LINK_PIN_PREFIX}{name}"));
            let mode = if link_pin.exists() {
                let mode = take_over_link(program, &name, &link_pin)?;
                tracing::info!(interface = %name, ifindex, mode, "XDP: took over the pinned link (program replaced atomically, no packet missed)");
                if !config.xdp_mode.accepts(&mode) {
                    tracing::warn!(interface = %name, mode, wanted = ?config.xdp_mode, "XDP: the pinned link keeps its mode; run relayd --detach-xdp while relayd is stopped to change it");
                }
                mode
            } else {
                let mode = attach(program, &name, config.xdp_mode, &link_pin)?;
                tracing::info!(interface = %name, ifindex, mode, "XDP: attached");
                mode.to_owned()
            };
            attached.push(InterfaceStatus {
                name,
                ifindex,
                xdp_mode: mode,
            });
        }
        let (workers, workers_reason) = match config.transcrypt {
            TranscryptPath::Sockets => (None, None),
            choice => match kernel.start_workers(&interfaces) {
                Ok(workers) => {
                    let status = workers.status();
                    tracing::info!(
                        threads = status.threads,
                        sockets = status.sockets.len(),
                        zero_copy = status.sockets.iter().all(|socket| socket.zero_copy),
                        "XDP: AF_XDP workers carry bridged media"
                    );
                    (Some(workers), None)
                }
                Err(err) if choice == TranscryptPath::Auto => {
                    let reason = format!("{err:#}");
                    tracing::warn!(
                        "XDP: bridged media stays on the relay's sockets: AF_XDP workers could not start: {reason}"
                    );
                    (None, Some(reason))
                }
                Err(err) => return Err(err.context("datapath.transcrypt = \"af_xdp\"")),
            },
        };
        Ok(XdpDatapath {
            workers,
            workers_reason,
            kernel: Mutex::new(kernel),
            interfaces: attached,
            slow_path: SocketForwarder::new(runtime),
        })
    }

    fn kernel(&self) -> std::sync::MutexGuard<'_, KernelProgram> {
        self.kernel.lock().expect("kernel program poisoned")
    }
}

impl Datapath for XdpDatapath {
    fn status(&self) -> DatapathStatus {
        let kernel = self.kernel();
        DatapathStatus {
            kind: DatapathKind::Xdp,
            interfaces: self.interfaces.clone(),
            capacity: kernel.capacity,
            fallback_reason: None,
            pin_dir: Some(kernel.pin_dir.display().to_string()),
            workers: self.workers.as_ref().map(Workers::status),
            workers_reason: self.workers_reason.clone(),
        }
    }

    fn install(
        &self,
        id: u32,
        generation: u32,
        spec: &FlowSpec,
        slow_path: SlowPath,
    ) -> Result<(), DatapathError> {
        // Sockets first: a flow whose relay address cannot be bound is refused before the
        // kernel sees it. A flow another component serves has none of relayd's (an adopted
        // flow whose owner came back: the sockets it had are released).
        match slow_path {
            SlowPath::Sockets => self.slow_path.install(spec)?,
            SlowPath::External => self.slow_path.remove(spec),
        }
        if let Err(err) = self.kernel().install(id, generation, spec) {
            self.slow_path.remove(spec);
            return Err(err);
        }
        Ok(())
    }

    fn remove(&self, spec: &FlowSpec) {
        self.kernel().remove(spec);
        self.slow_path.remove(spec);
    }

    fn counters(&self, spec: &FlowSpec) -> FlowCounters {
        self.kernel()
            .counters(spec)
            .merge(self.slow_path.counters(spec))
    }

    fn counters_of(&self, flows: &[(u32, FlowSpec)]) -> Vec<FlowCounters> {
        let mut kernel = self.kernel();
        let all = match kernel.counters_by_id() {
            Ok(all) => all,
            Err(err) => {
                tracing::warn!(%err, "XDP: batch lookup of the flow map failed; reading flow by flow");
                Vec::new()
            }
        };
        let slow_path = self
            .slow_path
            .counters_of(flows.iter().map(|(_, spec)| spec));
        // Both in id order: one pass, no hashing.
        let mut next = 0;
        flows
            .iter()
            .zip(slow_path)
            .map(|((id, spec), slow_path)| {
                while next < all.len() && all[next].0 < *id {
                    next += 1;
                }
                let key = spec.key();
                let batched = all[next..]
                    .iter()
                    .take_while(|(other, _, _)| other == id)
                    .find(|(_, other, _)| *other == key);
                // A flow the batch did not see (installed meanwhile) is read by itself.
                let in_kernel = match batched {
                    Some((_, _, counters)) => *counters,
                    None => kernel.counters(spec),
                };
                in_kernel.merge(slow_path)
            })
            .collect()
    }

    fn stats(&self) -> DatapathStats {
        DatapathStats {
            verdicts: self.kernel().verdicts(),
            userspace: self.slow_path.stats(),
        }
    }

    fn installed(&self) -> Vec<(u32, u32, FlowSpec)> {
        self.kernel().installed()
    }

    fn workers(&self) -> Option<&Workers> {
        self.workers.as_ref()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))
}

fn map_data(map: &Map) -> anyhow::Result<&MapData> {
    match map {
        Map::HashMap(data) => Ok(data),
        other => bail!("map has unexpected type {other:?}"),
    }
}

/// Attaches in the requested mode; `auto` tries native (driver) mode, then generic.
/// Attaches in the requested mode (`auto`: native, then generic) and pins the link at
/// The verdict counters pinned by a relayd with fewer (or more) verdicts than this one's:
/// their pin is removed so the loader makes a map of the right size. Only counters are lost
/// (the flows map, which matters, keeps its layout across versions).
fn renew_stats_pin_of_other_size(pin_dir: &Path) {
    let pin = pin_dir.join(STATS_MAP);
    let Ok(pinned) = aya::maps::MapData::from_pin(&pin) else {
        return;
    };
    match pinned.info().map(|info| info.max_entries()) {
        Ok(entries) if entries != Verdict::COUNT => {
            tracing::warn!(
                pinned = entries,
                verdicts = Verdict::COUNT,
                "XDP: the pinned verdict counters are of another relayd version; they restart from zero"
            );
            let _ = std::fs::remove_file(&pin);
        }
        _ => {}
    }
}

/// `link_pin`, so that the program stays attached when relayd stops.
fn attach(
    program: &mut Xdp,
    interface: &str,
    choice: XdpModeChoice,
    link_pin: &Path,
) -> anyhow::Result<&'static str> {
    let try_mode = |program: &mut Xdp, mode| -> Result<(), anyhow::Error> {
        let id = program.attach(interface, mode)?;
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the kernel attached XDP without a bpf_link, which cannot be pinned")?;
        link.pin(link_pin)
            .with_context(|| format!("pinning the XDP link at {}", link_pin.display()))?;
        Ok(())
    };
    match choice {
        XdpModeChoice::Native => try_mode(program, XdpMode::Driver)
            .with_context(|| format!("attaching XDP to {interface} in native mode"))
            .map(|()| "native"),
        XdpModeChoice::Generic => try_mode(program, XdpMode::Skb)
            .with_context(|| format!("attaching XDP to {interface} in generic mode"))
            .map(|()| "generic"),
        XdpModeChoice::Auto => match try_mode(program, XdpMode::Driver) {
            Ok(()) => Ok("native"),
            Err(native_err) => {
                tracing::warn!(interface, err = %native_err, "XDP: native mode refused; trying generic mode");
                try_mode(program, XdpMode::Skb)
                    .with_context(|| {
                        format!("attaching XDP to {interface} (native: {native_err}; generic)")
                    })
                    .map(|()| "generic")
            }
        },
    }
}

/// Name prefix of the pinned XDP links in the pin directory, followed by the interface name.
const LINK_PIN_PREFIX: &str = "link_";

/// Replaces the program of the link a previous relayd pinned at `link_pin` with `program`,
/// atomically: packets keep flowing through the old program until the new one takes over.
/// Returns the link's mode.
fn take_over_link(program: &mut Xdp, interface: &str, link_pin: &Path) -> anyhow::Result<String> {
    let pinned = PinnedLink::from_pin(link_pin)
        .with_context(|| format!("opening the pinned XDP link {}", link_pin.display()))?;
    let link = XdpLink::try_from(FdLink::from(pinned))
        .with_context(|| format!("{} is not an XDP link", link_pin.display()))?;
    program
        .attach_to_link(link)
        .with_context(|| format!("replacing the program on {interface}'s pinned XDP link"))?;
    Ok(attached_mode(interface).unwrap_or_else(|| "unknown".to_owned()))
}

/// "native" or "generic", as the kernel reports the interface's XDP attachment (iproute2).
fn attached_mode(interface: &str) -> Option<String> {
    let output = std::process::Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", interface])
        .output()
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    // XDP_ATTACHED_DRV = 1, XDP_ATTACHED_SKB = 2, XDP_ATTACHED_HW = 3 (linux/if_link.h).
    match links.get(0)?.get("xdp")?.get("mode")?.as_u64()? {
        1 => Some("native".to_owned()),
        2 => Some("generic".to_owned()),
        3 => Some("offload".to_owned()),
        _ => None,
    }
}

/// Unpins (and so detaches) links pinned for interfaces that are no longer configured.
fn detach_stale_links(pin_dir: &Path, interfaces: &[(String, u32)]) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(interface) = name.strip_prefix(LINK_PIN_PREFIX)
            && !interfaces
                .iter()
                .any(|(configured, _)| configured == interface)
        {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("unpinning {}", entry.path().display()))?;
            tracing::info!(
                interface,
                "XDP: detached from an interface no longer in datapath.interfaces"
            );
        }
    }
    Ok(())
}

/// `relayd --detach-xdp`: unpins every link and map in `pin_dir`, which detaches the
/// program and frees the flow table. Returns what was removed.
pub fn detach_all(pin_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(err) => return Err(err).with_context(|| format!("reading {}", pin_dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        removed.push(path.display().to_string());
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(removed)
}

pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c_name = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!(
            "datapath.interfaces: {name:?}: no such interface: {}",
            io::Error::last_os_error()
        );
    }
    Ok(index)
}

/// bpf_fib_lookup refuses to resolve anything when forwarding is off on the device it starts
/// from; the program starts from `lo`, so forwarding is turned on for `lo` only and the kernel
/// itself still forwards nothing (XDP-FACTS.md).
fn enable_loopback_forwarding() -> anyhow::Result<()> {
    for (path, required) in [
        ("/proc/sys/net/ipv4/conf/lo/forwarding", true),
        ("/proc/sys/net/ipv6/conf/lo/forwarding", false),
    ] {
        match std::fs::read_to_string(path) {
            Ok(value) if value.trim() == "1" => {}
            Ok(_) => {
                std::fs::write(path, "1").with_context(|| format!("setting {path} to 1"))?;
                tracing::info!("XDP: set {path} = 1 so bpf_fib_lookup can resolve next hops");
            }
            Err(err) if !required && err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("reading {path}")),
        }
    }
    Ok(())
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let root = CString::new(paths::BPFFS_ROOT).expect("static path");
    // SAFETY: statfs fills a struct we own from a NUL-terminated path.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(root.as_ptr(), &mut fs) } == 0 && fs.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    let bpf = CString::new("bpf").expect("static");
    // SAFETY: mount with NUL-terminated strings we own and no data.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            root.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "{} is not a BPF filesystem and mounting one failed: {}",
            paths::BPFFS_ROOT,
            io::Error::last_os_error()
        );
    }
    tracing::info!("mounted the BPF filesystem on {}", paths::BPFFS_ROOT);
    Ok(())
}

struct VlanDeviceInfo {
    name: String,
    ifindex: u32,
    vlan_id: u16,
}

/// VLAN devices whose parent is `parent`, from /proc/net/vlan/config (absent when the 8021q
/// module is not loaded, i.e. there are none).
fn vlan_devices_on(parent: &str) -> anyhow::Result<Vec<VlanDeviceInfo>> {
    let text = match std::fs::read_to_string("/proc/net/vlan/config") {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).context("reading /proc/net/vlan/config"),
    };
    let mut devices = Vec::new();
    // Lines after the two header lines: "eth0.100       | 100  | eth0".
    for line in text.lines().skip(2) {
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [name, vlan_id, device] = fields[..]
            && device == parent
            && let Ok(vlan_id) = vlan_id.parse()
        {
            devices.push(VlanDeviceInfo {
                name: name.to_owned(),
                ifindex: ifindex(name)?,
                vlan_id,
            });
        }
    }
    Ok(devices)
}
