//! The kernel's verifier walks every path of a program, up to 1,000,000
//! instructions. The pipeline's programs must stay well below that: near
//! the limit, a small change (or another kernel's verifier) refuses them.

use anyhow::Result;
use sluice_tests::fib::FibBed;

/// Headroom kept below the verifier's limit of 1,000,000.
const BUDGET: u32 = 850_000;

#[test]
fn the_programs_stay_within_the_verifiers_budget() -> Result<()> {
    let services = "services:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    backends:\n      - address: 10.1.0.2:8080\n";
    let mut bed = FibBed::new(services)?;
    let (xdp, tc) = bed.datapath.verified_instructions()?;
    println!("verified instructions: xdp {xdp}, tc {tc} (budget {BUDGET})");
    assert!(xdp > 0 && tc > 0, "the kernel reported no counts");
    assert!(xdp < BUDGET, "XDP program: {xdp} verified instructions");
    assert!(tc < BUDGET, "TC program: {tc} verified instructions");
    let (xdp, tc) = bed.datapath.resyn_verified_instructions()?;
    println!("the refusal-to-SYN programs they tail-call: xdp {xdp}, tc {tc}");
    assert!(xdp > 0 && tc > 0, "the kernel reported no counts");
    assert!(xdp < BUDGET && tc < BUDGET, "xdp {xdp}, tc {tc}");
    let (xdp, tc) = bed.datapath.encap_verified_instructions()?;
    println!("the tunnelled-DSR wrapping programs they tail-call: xdp {xdp}, tc {tc}");
    assert!(xdp > 0 && tc > 0, "the kernel reported no counts");
    assert!(xdp < BUDGET && tc < BUDGET, "xdp {xdp}, tc {tc}");
    Ok(())
}
