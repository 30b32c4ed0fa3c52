//! Running a command-line tool (`helm`, `kubectl`, …) to completion from an async test and
//! checking how it ended. Each helper panics with the command and its output when the outcome
//! is not the expected one, so a test reads as the steps it takes.

use std::process::{Command, Output};

/// Runs `cmd` to completion on the tokio runtime; panics only if it cannot be started.
pub async fn output(cmd: Command) -> Output {
    let desc = format!("{cmd:?}");
    tokio::process::Command::from(cmd)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {desc}: {e}"))
}

/// Runs `cmd`, panics with its stdout and stderr unless it succeeds, returns stdout.
pub async fn ok(cmd: Command) -> String {
    let desc = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "{desc} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd`, panics if it succeeds, returns stdout followed by stderr.
pub async fn fails(cmd: Command) -> String {
    let desc = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let out = output(cmd).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{desc} should have failed:\n{text}");
    text
}
