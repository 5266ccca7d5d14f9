//! Several hosts on one machine: network namespaces on one bridge, every link shaped with
//! `tc tbf`, for benchmarks that need real bandwidth limits (`shoal-bench swarm`).
//!
//! A [`Network`] is a bridge in a namespace of its own plus, per [`Host`], a namespace with a
//! veth (`eth0`) onto that bridge and an address on one /24. With a rate set, a token bucket
//! sits on *both* ends of each veth: on the host's end it caps what the host sends (upload),
//! on the bridge's end what it receives (download). Dropping the `Network` kills whatever still
//! runs in its namespaces and deletes them, so a failed or interrupted run leaves nothing
//! behind; [`remove_stale`] cleans up after a run that was killed outright.
//!
//! Code reaches a host in two ways: [`command`] runs a program there through `nsenter --net`
//! (not `ip netns exec`, which remounts /sys and hides the cgroup mounts), and [`in_netns`]
//! runs a closure on a thread that has joined the namespace, so the harness's own HTTP
//! client, `wait_for_tcp` and `Command`s work unchanged: threads and processes started from
//! that thread stay in the namespace.
//!
//! [`registry`] runs `docker-registry` on a host; [`bittorrent`] an opentracker + aria2c swarm,
//! the baseline Shoal is measured against.

pub mod bittorrent;
pub mod registry;

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::CloneFlags;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::proc;

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The host side of every veth.
pub const HOST_IFACE: &str = "eth0";

const BRIDGE_IFACE: &str = "br0";
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// A token bucket for each direction of every host link.
#[derive(Clone, Debug, PartialEq)]
pub struct Shaping {
    pub rate_mbit: f64,
    /// `tc` size, e.g. `256kb` (kilobytes).
    pub burst: String,
    /// `tc` time, e.g. `100ms`.
    pub latency: String,
}

impl Shaping {
    /// `rate_mbit` with a 256 KB burst and 100 ms of queue, as checked in RECIPES.md.
    pub fn rate(rate_mbit: f64) -> Shaping {
        Shaping {
            rate_mbit,
            burst: "256kb".to_owned(),
            latency: "100ms".to_owned(),
        }
    }

    fn tc_args(&self) -> Vec<String> {
        // tc takes `kbit` with decimals; Mbit/s with a fraction would round otherwise.
        let kbit = (self.rate_mbit * 1000.0).round() as u64;
        [
            "tbf".to_owned(),
            "rate".to_owned(),
            format!("{kbit}kbit"),
            "burst".to_owned(),
            self.burst.clone(),
            "latency".to_owned(),
            self.latency.clone(),
        ]
        .into()
    }
}

/// One host: a namespace with `eth0` on the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// What the caller called it (`registry`, `peer3` ...).
    pub label: String,
    /// The namespace's name under [`NETNS_DIR`].
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Host {
    /// `ip:port`.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    /// `program`, to be run on this host.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command(&self.netns, program)
    }

    /// Runs `f` on a thread inside this host's namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(&self.netns, f)
    }
}

/// A bridge and the hosts on it; everything is deleted on drop.
#[derive(Debug)]
pub struct Network {
    prefix: String,
    bridge: String,
    subnet: [u8; 3],
    shaping: Option<Shaping>,
    hosts: Vec<Host>,
    /// Namespaces made so far, bridge first: what drop deletes.
    made: Vec<String>,
}

impl Network {
    /// A bridge in namespace `{prefix}-br`; hosts will be `{prefix}-{label}` on
    /// `subnet.0/24`, shaped as `shaping` says (or not at all).
    pub fn new(prefix: &str, subnet: [u8; 3], shaping: Option<Shaping>) -> Result<Network> {
        let mut net = Network {
            prefix: prefix.to_owned(),
            bridge: format!("{prefix}-br"),
            subnet,
            shaping,
            hosts: Vec::new(),
            made: Vec::new(),
        };
        let bridge = net.bridge.clone();
        net.add_netns(&bridge)?;
        ip(&["-n", &bridge, "link", "add", BRIDGE_IFACE, "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", BRIDGE_IFACE, "up"])?;
        Ok(net)
    }

    /// Adds host `label` at `subnet.host_octet`.
    pub fn add_host(&mut self, label: &str, host_octet: u8) -> Result<Host> {
        let netns = format!("{}-{label}", self.prefix);
        let [a, b, c] = self.subnet;
        let host = Host {
            label: label.to_owned(),
            netns: netns.clone(),
            ip: Ipv4Addr::new(a, b, c, host_octet),
        };
        if self
            .hosts
            .iter()
            .any(|h| h.ip == host.ip || h.netns == netns)
        {
            bail!(
                "{label} ({}) clashes with a host already on the network",
                host.ip
            );
        }
        self.add_netns(&netns)?;
        // The bridge's end is named after the host's number: unique on the bridge, and short
        // enough for IFNAMSIZ whatever the label.
        let port = format!("h{host_octet}");
        ip(&[
            "link",
            "add",
            HOST_IFACE,
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.bridge,
        ])
        .with_context(|| format!("linking {label} to the bridge"))?;
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &port,
            "master",
            BRIDGE_IFACE,
        ])?;
        ip(&["-n", &self.bridge, "link", "set", &port, "up"])?;
        let cidr = format!("{}/24", host.ip);
        ip(&["-n", &netns, "addr", "add", &cidr, "dev", HOST_IFACE])?;
        ip(&["-n", &netns, "link", "set", HOST_IFACE, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        if let Some(shaping) = &self.shaping {
            for (ns, dev) in [(&netns, HOST_IFACE), (&self.bridge, port.as_str())] {
                let mut args = vec!["-n", ns, "qdisc", "add", "dev", dev, "root"];
                let tbf = shaping.tc_args();
                args.extend(tbf.iter().map(String::as_str));
                proc::run_ok(Command::new("tc").args(&args), IP_TIMEOUT)
                    .with_context(|| format!("shaping {label}'s link"))?;
            }
        }
        self.hosts.push(host.clone());
        Ok(host)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Every namespace this network made (the bridge's too).
    pub fn namespaces(&self) -> &[String] {
        &self.made
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.made.push(name.to_owned());
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Hosts before the bridge; deleting a host's namespace takes its veth with it.
        for ns in self.made.drain(..).rev() {
            if let Err(e) = delete_netns(&ns) {
                eprintln!("deleting network namespace {ns}: {e:#}");
            }
        }
    }
}

/// Kills what still runs in `netns` (everything the harness started there is stopped by its
/// own guard first; this catches strays such as hook scripts) and deletes it.
pub fn delete_netns(netns: &str) -> Result<()> {
    for pid in pids(netns)? {
        // It may be gone already: the namespace's deletion is what matters.
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    ip(&["netns", "del", netns])
}

/// Processes in `netns`.
fn pids(netns: &str) -> Result<Vec<i32>> {
    let out = proc::run_ok(
        Command::new("ip").args(["netns", "pids", netns]),
        IP_TIMEOUT,
    )?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// The namespaces `ip netns` knows.
pub fn list() -> Result<Vec<String>> {
    let out = proc::run_ok(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Deletes namespaces named `{base}-{pid}-...` whose `pid` is no longer running: left by a run
/// that was killed before it could clean up. Returns their names.
pub fn remove_stale(base: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in list()? {
        let Some(pid) = ns
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        delete_netns(&ns)?;
        removed.push(ns);
    }
    Ok(removed)
}

/// `program` run in `netns` through `nsenter --net` (which execs it: the child's pid is the
/// program's).
pub fn command(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{netns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `f` on a new thread that has joined `netns`, and returns what it returns.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    thread::scope(|s| {
        s.spawn(|| {
            enter(netns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("a thread in network namespace {netns} panicked"))?
    })
}

/// Moves the calling thread into `netns`, for good: call it only on a thread of its own.
pub fn enter(netns: &str) -> Result<()> {
    let path = format!("{NETNS_DIR}/{netns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("joining network namespace {netns}"))
}

fn ip(args: &[&str]) -> Result<()> {
    proc::run_ok(Command::new("ip").args(args), IP_TIMEOUT)?;
    Ok(())
}
