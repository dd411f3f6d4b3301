//! `socktrace doctor`: what this kernel supports, and the probe mode and
//! attach type socktrace would use.

use anyhow::bail;

use crate::probes::{ProbeOptions, features};

pub fn run(options: &ProbeOptions) -> anyhow::Result<()> {
    let (checks, chosen) = features::doctor(options);
    for check in &checks {
        let mark = if check.ok { "ok  " } else { "FAIL" };
        println!("{mark} {:<12} {}", check.name, check.detail);
    }
    match chosen {
        Some(chosen) => {
            println!("mode: {}", chosen.mode);
            println!(
                "attach: {} (per-socket state in {})",
                chosen.attach,
                chosen.attach.store()
            );
            Ok(())
        }
        None => bail!("socktrace cannot run on this kernel (see the failures above)"),
    }
}
