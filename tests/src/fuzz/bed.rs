//! The datapath under test: loaded with the world's services, in a private
//! namespace with real routes and neighbours (so FIB lookups succeed and
//! rewrites happen), run by BPF_PROG_TEST_RUN as if each packet arrived on
//! the LB's client- or backend-side interface.

use agent_common::{reason, registry::program};
use anyhow::{Context, Result, bail};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode};
use sluice::{datapath::Datapath, reconcile::Reconciler};
use testbed::Netns;

use super::{
    generate::Program,
    oracle::Verdict,
    world::{Side, World},
};
use crate::fib::FibBed;

/// Conntrack entries: small enough that a million packets make the LRU
/// map evict (each flow takes two).
const CONNTRACK_ENTRIES: u32 = 16_384;

pub struct Bed {
    datapath: Datapath,
    reconciler: Reconciler,
    /// ifindex of `t0` and `t1`, once inside the namespace.
    ifindex: [u32; 2],
    /// The reason counters after the last packet.
    counted: Vec<u64>,
}

impl Bed {
    /// Loads `object` (the built-in one if None) with the world's services;
    /// returns the namespace to run it in, and the bed (to `attach` there).
    pub fn new(world: &World, object: Option<&[u8]>) -> Result<(Netns, Self)> {
        let object = object.unwrap_or(sluice::datapath::EBPF_OBJECT);
        let fib = FibBed::with_object(&world.services_yaml(), CONNTRACK_ENTRIES, object)?;
        let FibBed {
            ns,
            mut datapath,
            reconciler,
        } = fib;
        for n in &world.neighbours {
            let mac = n
                .mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            ns.exec(&[
                "ip",
                "neigh",
                "replace",
                &n.ip.to_string(),
                "lladdr",
                &mac,
                "dev",
                n.side.device(),
                "nud",
                "permanent",
            ])?;
        }
        let tc: &mut SchedClassifier = datapath
            .ebpf_mut()
            .program_mut(program::TC)
            .context("the TC program")?
            .try_into()?;
        tc.load().context("loading the TC program (verifier)")?;
        let counted = vec![0; reason::ALL.len()];
        Ok((
            ns,
            Self {
                datapath,
                reconciler,
                ifindex: [0; 2],
                counted,
            },
        ))
    }

    /// Inside the namespace: attaches the XDP program to both interfaces
    /// (native), which registers their receive queues so a test run may
    /// name them as its ingress, and keeps the program in the kernel's XDP
    /// dispatcher between runs.
    pub fn attach(&mut self) -> Result<()> {
        for (i, side) in [Side::Backends, Side::Clients].into_iter().enumerate() {
            let name = std::ffi::CString::new(side.device())?;
            // SAFETY: a valid C string; the call only reads it.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index == 0 {
                bail!("interface {} not found in the namespace", side.device());
            }
            self.ifindex[i] = index;
            let xdp: &mut Xdp = self.datapath.xdp_program()?;
            xdp.attach(side.device(), XdpMode::Driver)
                .with_context(|| format!("attaching XDP to {}", side.device()))?;
        }
        self.counted = self.read_reasons();
        Ok(())
    }

    fn read_reasons(&self) -> Vec<u64> {
        (0..reason::ALL.len() as u32)
            .map(|code| self.reconciler.reason_count(code))
            .collect()
    }

    fn ifindex_of(&self, side: Side) -> u32 {
        match side {
            Side::Backends => self.ifindex[0],
            Side::Clients => self.ifindex[1],
        }
    }

    /// Runs one packet (inside the namespace): the verdict, the frame after,
    /// and how much each reason counter grew.
    pub fn run(
        &mut self,
        frame: &[u8],
        program: Program,
        ingress: Side,
    ) -> Result<(Verdict, Vec<u8>, Vec<u64>)> {
        let ifindex = self.ifindex_of(ingress);
        let mut out = vec![0u8; frame.len() + 256];
        let (rc, size) = match program {
            Program::Xdp => {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
                // rx_queue_index, egress_ifindex.
                let md: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .collect();
                let xdp: &mut Xdp = self.datapath.xdp_program()?;
                let r = xdp
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&md),
                        ..TestRunOptions::default()
                    })
                    .with_context(|| format!("XDP test run of a {}-byte frame", frame.len()))?;
                let verdict = match r.return_value {
                    0 => Verdict::Aborted,
                    1 => Verdict::Drop,
                    2 => Verdict::Pass,
                    3 => Verdict::Tx,
                    4 => Verdict::Redirect,
                    other => Verdict::Other(other),
                };
                (verdict, r.data_size_out)
            }
            Program::Tc => {
                // struct __sk_buff up to `ifindex` (offset 40); the fields
                // before it must be zero.
                let mut skb = vec![0u8; 44];
                skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
                let tc: &mut SchedClassifier = self
                    .datapath
                    .ebpf_mut()
                    .program_mut(program::TC)
                    .context("the TC program")?
                    .try_into()?;
                let r = tc
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&skb),
                        ..TestRunOptions::default()
                    })
                    .with_context(|| format!("TC test run of a {}-byte frame", frame.len()))?;
                let verdict = match r.return_value {
                    0 => Verdict::Pass,     // TC_ACT_OK
                    2 => Verdict::Drop,     // TC_ACT_SHOT
                    7 => Verdict::Redirect, // TC_ACT_REDIRECT
                    other => Verdict::Other(other),
                };
                (verdict, r.data_size_out)
            }
        };
        out.truncate(size as usize);
        let now = self.read_reasons();
        let grown = now
            .iter()
            .zip(&self.counted)
            .map(|(n, before)| n.wrapping_sub(*before))
            .collect();
        self.counted = now;
        Ok((rc, out, grown))
    }
}
