//! Smoke run of the benchmark (issue 10, performance.md §5): `scripts/bench --smoke` builds
//! `derper` and `derp-bench`, starts our relay and upstream Go `derper` (built by
//! `tests/interop/build.sh`) and runs every workload for a fraction of a second against each,
//! including the real-client rows (R*: `derpinterop load`, built by the same script).
//!
//! It checks that everything runs and reports; it asserts nothing about speed. Like the other
//! interop tests it does not skip: a missing Go toolchain or python3 is a loud failure.

use std::process::Command;

#[test]
fn bench_smoke_runs_every_workload_against_ours_and_upstream() {
    let root = derp_tests::k8s::workspace_root();
    let out = Command::new("bash")
        .arg(root.join("scripts/bench"))
        .arg("--smoke")
        .current_dir(&root)
        .output()
        .expect("running scripts/bench --smoke");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/bench --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for id in [
        "| T1 |", "| T2 |", "| T3 |", "| T4 |", "| T4c |", "| T5 |", "| T6 |", "| T7 |", "| T10 |",
        "| M1 |", "| R1 |", "| R1s |", "| R1x |", "| R1t |", "| R2 |", "| R2t |", "| R3 |",
        "| R3p |",
    ] {
        assert!(
            stdout.contains(id),
            "no {id} row in the smoke table:\n{stdout}"
        );
    }
    // Both relays produced a number (a dash means a run measured nothing), also through a
    // mesh of two relays of each kind (M1) and under real Tailscale clients (R1-R3: CPU per
    // packet at fixed rates, context switches per packet, latency, capacity).
    for id in [
        "| T1 |", "| M1 |", "| R1 |", "| R1x |", "| R1t |", "| R2 |", "| R3 |",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(id))
            .expect("row present");
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(
            cells.get(3).is_some_and(|c| *c != "—") && cells.get(4).is_some_and(|c| *c != "—"),
            "{id} has no value for one relay: {row}"
        );
    }
}
