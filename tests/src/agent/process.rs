//! Container processes: spawn (own process group, tied to the agent), supervise and restart
//! with backoff, terminate (SIGTERM, then SIGKILL after the grace period), kill all at exit.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::launch::Launch;
use super::pod::PodCtx;
use super::probes::run_readiness_probe;
use super::{LOG_HEADER, lock, log_path};

/// A live process group started by the agent.
#[derive(Debug, Clone)]
pub(super) struct ProcEntry {
    pub(super) pid: i32,
    pub(super) namespace: String,
    pub(super) pod: String,
    pub(super) container: String,
}

/// SIGKILLs every process group and waits (up to 5 s) until they are reaped.
/// Repeats the kill until the table is empty, in case a supervisor was between its last
/// cancellation check and `spawn` (it kills its own process once it sees the cancellation).
pub(super) fn kill_all(procs: &Mutex<HashMap<u64, ProcEntry>>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<i32> = lock(procs).values().map(|p| p.pid).collect();
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                tracing::error!(?pids, "processes still running 5s after SIGKILL");
            }
            return;
        }
        for pid in &pids {
            signal_group(*pid, libc::SIGKILL);
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

fn signal_group(pid: i32, sig: i32) {
    if pid <= 1 {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names the group.
    unsafe {
        libc::kill(-pid, sig);
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

/// A started process: its pid and a handle resolving to its exit status (reaped).
pub(super) struct Running {
    pub(super) pid: i32,
    pub(super) exit: JoinHandle<std::io::Result<std::process::ExitStatus>>,
}

fn spawn_process(ctx: &PodCtx, idx: usize, launch: &Launch) -> anyhow::Result<Running> {
    let c = &ctx.spec_containers()[idx];
    let log = log_path(&ctx.shared.config.workdir, &ctx.ns, &ctx.name, &c.name);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    {
        use std::io::Write as _;
        writeln!(
            file,
            "{LOG_HEADER} pod {}/{} uid {} container {} exe {} args {:?}",
            ctx.ns,
            ctx.name,
            ctx.uid,
            c.name,
            launch.exe.display(),
            launch.argv
        )?;
    }
    std::fs::create_dir_all(&launch.cwd)?;
    let mut cmd = Command::new(&launch.exe);
    {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
    }
    cmd.args(&launch.argv)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut child = crate::k8s::spawn_tied(cmd)
        .with_context(|| format!("starting {}", launch.exe.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let id = ctx.shared.proc_seq.fetch_add(1, Ordering::Relaxed);
    let procs = ctx.shared.procs.clone();
    lock(&procs).insert(
        id,
        ProcEntry {
            pid,
            namespace: ctx.ns.clone(),
            pod: ctx.name.clone(),
            container: c.name.clone(),
        },
    );
    if ctx.shared.cancel.is_cancelled() {
        // The agent stopped while we were spawning: never leave this one behind.
        signal_group(pid, libc::SIGKILL);
    }
    // The blocking thread reaps the child and then forgets it, so Drop can wait on `procs`.
    let exit = tokio::task::spawn_blocking(move || {
        let status = child.wait();
        lock(&procs).remove(&id);
        status
    });
    Ok(Running { pid, exit })
}

/// Runs container `idx`: start, watch, probe, restart with backoff (`restartPolicy: Always`,
/// the only one accepted), stop on `stop`.
pub(super) async fn supervise(ctx: Arc<PodCtx>, idx: usize, stop: CancellationToken) {
    let c = ctx.spec_containers()[idx].clone();
    let mut backoff = ctx.shared.config.restart_backoff;
    let mut first = true;
    loop {
        // The agent's own token too: after `Drop` the worker is gone but this task may not be.
        if stop.is_cancelled() || ctx.shared.cancel.is_cancelled() {
            return;
        }
        if !first {
            ctx.update(idx, |s| s.restart_count += 1);
        }
        first = false;
        let launch = ctx.launch(idx);
        let mut running = match spawn_process(&ctx, idx, &launch) {
            Ok(r) => r,
            Err(e) => {
                let (reason, message) = ("RunContainerError", format!("{e:#}"));
                tracing::warn!(container = %c.name, reason, %message, "container not started");
                ctx.update(idx, |s| {
                    s.state = json!({"waiting": {"reason": reason, "message": message}});
                    s.started = false;
                    s.ready = false;
                });
                if sleep_or_stop(&stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(ctx.shared.config.max_restart_backoff);
                continue;
            }
        };
        let started_at = now_time();
        let started_instant = Instant::now();
        tracing::info!(container = %c.name, pid = running.pid, "container started");
        ctx.update(idx, |s| {
            s.state = json!({"running": {"startedAt": started_at}});
            s.started = true;
            s.ever_started = true;
            s.ready = c.readiness_probe.is_none();
            s.container_id = Some(format!("kubederp-node-agent://{}", running.pid));
        });
        let probes_stop = stop.child_token();
        let probes = tokio::spawn(run_readiness_probe(ctx.clone(), idx, probes_stop.clone()));
        let exited = tokio::select! {
            r = &mut running.exit => Some(r.unwrap_or_else(|e| Err(std::io::Error::other(e)))),
            () = stop.cancelled() => None,
        };
        probes_stop.cancel();
        let _ = probes.await;
        let status = match exited {
            Some(s) => s,
            None => {
                let grace = *lock(&ctx.stop_grace);
                terminate(&mut running, grace).await
            }
        };
        let (code, signal) = match &status {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt as _;
                (
                    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
                    st.signal(),
                )
            }
            Err(_) => (-1, None),
        };
        let reason = if code == 0 { "Completed" } else { "Error" };
        let mut terminated = json!({
            "exitCode": code,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": now_time(),
            "containerID": format!("kubederp-node-agent://{}", running.pid),
        });
        if let Some(sig) = signal {
            terminated["signal"] = json!(sig);
        }
        tracing::info!(container = %c.name, exit_code = code, "container exited");
        let stopping = stop.is_cancelled() || ctx.shared.cancel.is_cancelled();
        ctx.update(idx, |s| {
            s.started = false;
            s.ready = false;
            if stopping {
                s.state = json!({"terminated": terminated});
            } else {
                s.last_state = json!({"terminated": terminated});
                s.state = json!({"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": format!("back-off {}s restarting failed container", backoff.as_secs_f32()),
                }});
            }
        });
        if stopping {
            return;
        }
        // Kubelet resets the backoff after a container ran for a while (10 min there).
        if started_instant.elapsed() > Duration::from_secs(60) {
            backoff = ctx.shared.config.restart_backoff;
        }
        if sleep_or_stop(&stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(ctx.shared.config.max_restart_backoff);
    }
}

/// Sleeps; true when `stop` fired first.
pub(super) async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// SIGTERM the process group, SIGKILL after `grace`, and reap.
async fn terminate(
    running: &mut Running,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(running.pid, libc::SIGTERM);
    match tokio::time::timeout(grace, &mut running.exit).await {
        Ok(r) => r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(_) => {
            signal_group(running.pid, libc::SIGKILL);
            (&mut running.exit)
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        }
    }
}
