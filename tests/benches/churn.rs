//! `cargo bench -p trellis-tests --bench churn [N...]` (root): the churn scenarios of issue 17 at
//! full size (`tests/src/churn.rs`), each printing `failed/total`. `TRELLIS_CHURN_SIZE=ci` runs
//! them at the CI suite's size.

use trellis_tests::churn::{Size, run_scenario, scenarios};

fn main() {
    let size = match std::env::var("TRELLIS_CHURN_SIZE").as_deref() {
        Ok("ci") => Size::ci(),
        _ => Size::full(),
    };
    let picked: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!("machine: {cores} cores, {machine}; size: {size:?}");
    for (i, (name, lossless)) in scenarios().into_iter().enumerate() {
        let n = i + 1;
        if !picked.is_empty() && !picked.contains(&n) {
            continue;
        }
        let t = run_scenario(n, &size);
        eprintln!(
            "churn {n} {name}: {t}{}",
            if lossless {
                ""
            } else {
                " (bounded, not lossless)"
            }
        );
    }
}
