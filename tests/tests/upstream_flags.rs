//! Upstream command lines, checked against the real upstream `derper` (tailscale.com v1.104.7,
//! built by `tests/interop/build.sh`): its Go `flag` package decides which forms are valid,
//! and our [`normalize_go_flags`] must accept exactly those, with the same meaning.
//!
//! 1. The flag list and each flag's kind come from the binary: names from `derper -h`, and a
//!    flag is boolean when `-version -<flag>` is accepted (a value flag fails with "flag needs
//!    an argument"). They must equal [`UPSTREAM_FLAGS`].
//! 2. Every flag in every form (`-f v`, `--f v`, `-f=v`, `--f=v`; for booleans `-f`, `--f`
//!    and `-f=<s>` for every `strconv.ParseBool` spelling and some it refuses) is given to
//!    upstream after `-version` (so it parses and exits) and to us: both accept or both refuse,
//!    and ours yields the value given. Unsupported flags are refused naming the flag.
//! 3. What a boolean spelling *means* upstream is observed through `-version=<s> -a=bad`:
//!    true prints the version, false goes on and fails on the address.
#![allow(clippy::unwrap_used)]

use std::process::{Output, Stdio};
use std::time::Duration;

use clap::Parser as _;
use derp_tests::interop::{TS_NEW, upstream_derper};
use derper::args::{Args, FlagError, FlagKind, UPSTREAM_FLAGS, normalize_go_flags};

const TRUE: [&str; 6] = ["1", "t", "T", "TRUE", "true", "True"];
const FALSE: [&str; 6] = ["0", "f", "F", "FALSE", "false", "False"];
const NOT_BOOL: [&str; 4] = ["yes", "on", "tRUE", ""];

async fn upstream(args: &[String]) -> Output {
    let cmd = tokio::process::Command::new(upstream_derper(TS_NEW))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start upstream derper");
    // Bounded: a command line that does not stop at -version would start a server.
    tokio::time::timeout(Duration::from_secs(20), cmd.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("upstream derper {args:?} did not exit"))
        .expect("upstream derper output")
}

fn ours(form: &[String]) -> Result<Vec<String>, FlagError> {
    normalize_go_flags(std::iter::once("derper".to_owned()).chain(form.iter().cloned()))
}

fn sample(name: &str) -> &'static str {
    match name {
        "certmode" => "manual",
        "home" => "blank",
        "http-port" => "-1",
        "stun-port" => "3479",
        "accept-connection-limit" => "2.5",
        "accept-connection-burst" => "7",
        "tcp-keepalive-time" | "tcp-user-timeout" | "tcp-write-timeout" => "7s",
        _ => "-sample/value",
    }
}

#[tokio::test]
async fn every_upstream_flag_form_means_the_same_here() {
    // 1. the list and the kinds, from the binary
    let help = upstream(&["-h".to_owned()]).await;
    assert!(help.status.success(), "derper -h: {help:?}");
    let text = String::from_utf8_lossy(&help.stderr);
    let mut listed = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("  -") else {
            continue;
        };
        let name = rest.split_whitespace().next().unwrap().to_owned();
        let probe = upstream(&["-version".to_owned(), format!("-{name}")]).await;
        let kind = if probe.status.success() {
            FlagKind::Bool
        } else {
            let err = String::from_utf8_lossy(&probe.stderr);
            assert!(
                err.contains(&format!("flag needs an argument: -{name}")),
                "-version -{name}: {err}"
            );
            FlagKind::Value
        };
        listed.push((name, kind));
    }
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut table: Vec<(String, FlagKind)> = UPSTREAM_FLAGS
        .iter()
        .map(|f| (f.name.to_owned(), f.kind))
        .collect();
    table.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(table, listed, "UPSTREAM_FLAGS differs from derper -h");
    assert_eq!(listed.len(), 35, "{listed:?}");

    // 2. every form: upstream and we agree on accepting it, and we keep the value
    let mut checked = 0;
    for f in UPSTREAM_FLAGS {
        let n = f.name;
        // (form, Some(meaning as clap text) when Go accepts it)
        let mut forms: Vec<(Vec<String>, Option<String>)> = Vec::new();
        match f.kind {
            FlagKind::Value => {
                let v = sample(n).to_owned();
                for d in ["-", "--"] {
                    forms.push((vec![format!("{d}{n}"), v.clone()], Some(v.clone())));
                    forms.push((vec![format!("{d}{n}={v}")], Some(v.clone())));
                }
            }
            FlagKind::Bool => {
                for d in ["-", "--"] {
                    forms.push((vec![format!("{d}{n}")], Some("true".into())));
                    for (set, meaning) in [(&TRUE[..], Some("true")), (&FALSE[..], Some("false"))]
                        .into_iter()
                        .chain([(&NOT_BOOL[..], None)])
                    {
                        for s in set {
                            forms.push((vec![format!("{d}{n}={s}")], meaning.map(String::from)));
                        }
                    }
                }
            }
        }
        for (form, meaning) in forms {
            checked += 1;
            let mut args = vec!["-version".to_owned()];
            args.extend(form.iter().cloned());
            args.push("-a=bad".to_owned());
            let up = upstream(&args).await;
            let up_err = String::from_utf8_lossy(&up.stderr).into_owned();
            let mine = ours(&form);
            let Some(meaning) = meaning else {
                assert_eq!(up.status.code(), Some(2), "upstream {args:?}: {up_err}");
                assert!(up_err.contains("invalid boolean value"), "{up_err}");
                assert!(
                    matches!(mine, Err(FlagError::InvalidBool { .. })),
                    "{form:?}: {mine:?}"
                );
                continue;
            };
            if n == "version" {
                // 3. what the spelling means upstream
                let up_true = up.status.success();
                assert_eq!(
                    up_true,
                    meaning == "true",
                    "upstream {args:?}: {up:?} (expected {meaning})"
                );
                if !up_true {
                    assert!(up_err.contains("invalid server address"), "{up_err}");
                }
                let argv = mine.unwrap_or_else(|e| panic!("{form:?}: {e}"));
                assert_eq!(argv.contains(&"--version".to_owned()), up_true, "{argv:?}");
                continue;
            }
            assert!(
                up.status.success(),
                "upstream refused {args:?} ({:?}): {up_err}",
                up.status
            );
            match f.ours {
                None => assert_eq!(
                    mine.as_ref().map_err(ToString::to_string),
                    Err(format!(
                        "upstream flag -{n} is not supported by kubederp derper (yet)"
                    )),
                    "{form:?}"
                ),
                Some(long) => {
                    let argv = mine.unwrap_or_else(|e| panic!("{form:?}: {e}"));
                    assert_eq!(argv[1..], [format!("--{long}={meaning}")], "{form:?}");
                    Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
                }
            }
        }
    }
    assert!(checked > 300, "{checked} forms");
}
