//! Smoke run of the benchmark (issue 10, performance.md §5): `scripts/bench --smoke` builds
//! `derper` and `derp-bench`, starts our relay and upstream Go `derper` (built by
//! `tests/interop/build.sh`) and runs every workload for a fraction of a second against each,
//! including the real-client rows (R*: `derpinterop load`, built by the same script).
//!
//! It checks that everything runs and reports; it asserts nothing about speed. Like the other
//! interop tests it does not skip: a missing Go toolchain or python3 is a loud failure.

//!
//! `scripts/bench --profile --smoke` runs the floor profile (`bench/floor.py`, issue 19) the
//! same way: both relays under real clients with `perf record` attached, every sample put on a
//! path; the test checks that each relay's column has every path and adds up to the whole.

use std::process::Command;
use std::sync::Mutex;

/// The two smoke runs share the machine's two cores; one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `scripts/bench ARGS` and returns its stdout; panics with both streams if it failed.
fn run_bench(args: &[&str]) -> String {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = derp_tests::k8s::workspace_root();
    let out = Command::new("bash")
        .arg(root.join("scripts/bench"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("running scripts/bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

#[test]
fn bench_smoke_runs_every_workload_against_ours_and_upstream() {
    let stdout = run_bench(&["--smoke"]);
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

/// The percentages of one column of the floor profile's path table.
fn column_shares(stdout: &str, column: usize) -> Vec<f64> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("| path |"))
        .skip(2)
        .take_while(|l| l.starts_with('|') && !l.starts_with("| **total**"))
        .map(|row| {
            let cell = row.split('|').map(str::trim).nth(column + 1).unwrap_or("");
            let pct = cell
                .split_once('(')
                .and_then(|(_, p)| p.strip_suffix("%)"))
                .unwrap_or_else(|| panic!("no share in cell {cell:?} of row {row}"));
            pct.trim()
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("share {pct:?} in row {row}: {e}"))
        })
        .collect()
}

#[test]
fn bench_profile_smoke_splits_both_relays_cpu_by_path() {
    let stdout = run_bench(&["--profile", "--smoke"]);
    for label in [
        "| user space",
        "| `epoll_wait`",
        "| system call entry",
        "| send path",
        "| receive path",
        "| **total**",
        "| rc_20k |",
        "| rc_60k |",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(label)),
            "no {label} row in the profile:\n{stdout}"
        );
    }
    // Columns: 20 k ours, 20 k upstream, 60 k ours, 60 k upstream. Every sample is on one
    // path, and both relays spend time both sending and receiving.
    for column in 1..=4 {
        let shares = column_shares(&stdout, column);
        assert_eq!(shares.len(), 7, "seven paths in column {column}:\n{stdout}");
        let sum: f64 = shares.iter().sum();
        assert!(
            (sum - 100.0).abs() < 1.0,
            "column {column} adds up to {sum} %, not 100:\n{stdout}"
        );
        assert!(
            shares[3] > 0.0 && shares[4] > 0.0,
            "column {column} has no send or receive samples:\n{stdout}"
        );
    }
}
