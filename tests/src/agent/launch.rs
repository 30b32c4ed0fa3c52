//! What a container process is started with: its argv and env, with `$(VAR)` expansion,
//! `fieldRef` values, mountPath rewriting and wildcard listen addresses bound to the node IP.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Container;

use super::pod::PodCtx;
use super::spec::NodeSpec;

/// `PATH` given to processes whose Pod does not set one (the usual container default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Expands `$(VAR)` references the way Kubernetes does (`third_party/forked/golang/expansion`):
/// `$$` becomes `$`, `$(NAME)` becomes the value when `lookup` knows it and stays verbatim
/// otherwise, and any other `$` is kept.
fn expand_vars(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < input.len() {
        if input[cursor..].starts_with('$') && cursor + 1 < input.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.chars().next() {
                Some('$') => {
                    out.push('$');
                    1
                }
                Some('(') => match rest.find(')') {
                    Some(close) => {
                        let name = &rest[1..close];
                        match lookup(name) {
                            Some(v) => out.push_str(&v),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                Some(c) => {
                    out.push('$');
                    out.push(c);
                    c.len_utf8()
                }
                None => 0,
            };
            cursor += 1 + advance;
            checkpoint = cursor;
            continue;
        }
        cursor += input[cursor..].chars().next().map_or(1, char::len_utf8);
    }
    out.push_str(&input[checkpoint..]);
    out
}

/// Characters that may precede or follow a mountPath for it to be rewritten.
fn is_path_delimiter(c: char) -> bool {
    matches!(c, '=' | ':' | ',' | ';' | '@' | '"' | '\'') || c.is_whitespace()
}

/// Rewrites mountPaths to local directories (see the module docs for the rule). `mounts` must
/// be sorted longest mountPath first.
fn rewrite_mount_paths(input: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    let mut prev: Option<char> = None;
    'outer: while i < input.len() {
        let rest = &input[i..];
        if prev.is_none_or(is_path_delimiter) {
            for (mount_path, local) in mounts {
                if let Some(after) = rest.strip_prefix(mount_path.as_str())
                    && after
                        .chars()
                        .next()
                        .is_none_or(|c| c == '/' || is_path_delimiter(c))
                {
                    out.push_str(&local.to_string_lossy());
                    i += mount_path.len();
                    prev = mount_path.chars().last();
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        prev = Some(c);
        i += c.len_utf8().max(1);
    }
    out
}

/// Binds a wildcard listen argument to `ip`: an argument that is exactly `:<port>`,
/// `0.0.0.0:<port>` or `[::]:<port>`, or ends in `=` followed by one of those, gets `ip` as
/// its host. Anything else is returned unchanged.
fn bind_wildcard_listen(arg: &str, ip: Ipv4Addr) -> String {
    let (head, value) = match arg.rsplit_once('=') {
        Some((h, v)) => (format!("{h}="), v),
        None => (String::new(), arg),
    };
    let port = ["", "0.0.0.0", "[::]"]
        .iter()
        .find_map(|host| value.strip_prefix(host)?.strip_prefix(':'))
        .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    match port {
        Some(port) => format!("{head}{ip}:{port}"),
        None => arg.to_owned(),
    }
}

/// The value of a downward-API field. With host networking the Pod IP is the node IP.
fn field_value(path: &str, node: &NodeSpec) -> Option<String> {
    match path {
        "status.hostIP" | "status.podIP" => Some(node.ipv4.to_string()),
        _ => None,
    }
}

/// Resolves a container's env in order, with `$(VAR)` expansion against earlier variables and
/// mountPath rewriting of each value. A `fieldRef` the agent does not know leaves the variable
/// unset (validation refuses such Pods before they get here).
fn container_env(
    node: &NodeSpec,
    c: &Container,
    mounts: &[(String, PathBuf)],
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match &e.value_from {
            Some(from) => match from
                .field_ref
                .as_ref()
                .and_then(|f| field_value(&f.field_path, node))
            {
                Some(v) => v,
                None => continue,
            },
            None => expand_vars(e.value.as_deref().unwrap_or_default(), |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            }),
        };
        if let Some(slot) = vars.iter_mut().find(|(name, _)| *name == e.name) {
            slot.1 = value;
        } else {
            vars.push((e.name.clone(), value));
        }
    }
    vars.into_iter()
        .map(|(k, v)| (k, rewrite_mount_paths(&v, mounts)))
        .collect()
}

impl PodCtx {
    /// Executable, argv, env and working directory for container `idx`.
    pub(super) fn launch(&self, idx: usize) -> Launch {
        let c = &self.spec_containers()[idx];
        let node = &self.node;
        let mounts = &self.mounts[idx];
        let mut env = container_env(node, c, mounts);
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        if !env.iter().any(|(k, _)| k == "HOSTNAME") {
            env.push(("HOSTNAME".into(), node.name.clone()));
        }
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let command = c.command.clone().unwrap_or_default();
        let argv: Vec<String> = command
            .iter()
            .skip(1)
            .chain(c.args.iter().flatten())
            .map(|a| rewrite_mount_paths(&expand_vars(a, lookup), mounts))
            .map(|a| bind_wildcard_listen(&a, node.ipv4))
            .collect();
        Launch {
            exe: self.exes[idx].clone(),
            argv,
            env,
            cwd: self.dir.clone(),
        }
    }
}

pub(super) struct Launch {
    pub(super) exe: PathBuf,
    pub(super) argv: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) cwd: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = |n: &str| match n {
            "A" => Some("x".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(expand_vars("$(A)", vars), "x");
        assert_eq!(expand_vars("pre-$(A)-post", vars), "pre-x-post");
        assert_eq!(expand_vars("$$(A)", vars), "$(A)");
        assert_eq!(expand_vars("$$$(A)", vars), "$x");
        assert_eq!(expand_vars("$(B)", vars), "$(B)");
        assert_eq!(expand_vars("$(A", vars), "$(A");
        assert_eq!(expand_vars("a$", vars), "a$");
        assert_eq!(expand_vars("$x$(EMPTY)y", vars), "$xy");
        assert_eq!(expand_vars("é$(A)é", vars), "éxé");
        assert_eq!(expand_vars("$é", vars), "$é");
    }

    #[test]
    fn mount_paths_are_rewritten_only_as_whole_path_prefixes() {
        let mounts = vec![
            ("/var/lib/derper".to_owned(), PathBuf::from("/w/state")),
            ("/certs".to_owned(), PathBuf::from("/w/certs")),
        ];
        let r = |s: &str| rewrite_mount_paths(s, &mounts);
        assert_eq!(r("--certdir=/certs"), "--certdir=/w/certs");
        assert_eq!(r("/certs/a.crt"), "/w/certs/a.crt");
        assert_eq!(r("-c=/var/lib/derper/derper.key"), "-c=/w/state/derper.key");
        assert_eq!(r("/certsx"), "/certsx");
        assert_eq!(r("/x/certs"), "/x/certs");
        assert_eq!(r("a:/certs,/certs"), "a:/w/certs,/w/certs");
        assert_eq!(r("--flag /certs"), "--flag /w/certs");
    }

    #[test]
    fn wildcard_listen_arguments_are_bound_to_the_node_ip() {
        let ip = Ipv4Addr::new(127, 0, 0, 2);
        assert_eq!(bind_wildcard_listen(":443", ip), "127.0.0.2:443");
        assert_eq!(
            bind_wildcard_listen("--addr=:443", ip),
            "--addr=127.0.0.2:443"
        );
        assert_eq!(bind_wildcard_listen("0.0.0.0:80", ip), "127.0.0.2:80");
        assert_eq!(bind_wildcard_listen("[::]:80", ip), "127.0.0.2:80");
        assert_eq!(bind_wildcard_listen("127.0.0.9:443", ip), "127.0.0.9:443");
        assert_eq!(bind_wildcard_listen("--hostname=x", ip), "--hostname=x");
        assert_eq!(bind_wildcard_listen(":abc", ip), ":abc");
    }
}
