//! `kubederp-test-container`: a tiny program the node-agent tests run as a "container".
//!
//! Usage: `kubederp-test-container [--listen ADDR:PORT] [--ready-file PATH] [ARG...]`
//!
//! At start it prints `kubederp-test-container started pid=<pid>` and its arguments to stdout,
//! then, with `--listen`, serves plain HTTP/1.0:
//! - `GET /healthz` → 200;
//! - `GET /ready` → 200 when `--ready-file` is unset or the file exists, else 503;
//! - `GET /env` → the environment, one `K=V` per line, sorted;
//! - `GET /args` → the arguments, one per line;
//! - `GET /pid` → the process id;
//! - `GET /file?path=P` → the content of file P (404 when missing);
//! - `GET /exit?code=N` → answers, then exits with code N.
//!
//! Not here: anything beyond what the tests need; no dependencies but std.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut listen = None;
    let mut ready_file = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next().cloned());
        match flag {
            "--listen" => listen = value(),
            "--ready-file" => ready_file = value(),
            _ => {}
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "kubederp-test-container started pid={}",
        std::process::id()
    );
    for a in &args {
        let _ = writeln!(out, "arg: {a}");
    }
    let _ = out.flush();
    drop(out);
    let Some(addr) = listen else {
        loop {
            std::thread::park();
        }
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kubederp-test-container: bind {addr}: {e}");
            std::process::exit(2);
        }
    };
    eprintln!("kubederp-test-container listening on {addr}");
    for stream in listener.incoming().flatten() {
        let ready_file = ready_file.clone();
        std::thread::spawn(move || serve(stream, ready_file.as_deref()));
    }
}

fn serve(mut stream: TcpStream, ready_file: Option<&str>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    {
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            return;
        }
        // Drain the headers.
        let mut h = String::new();
        while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
            h.clear();
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(percent_decode)
    };
    let mut exit = None;
    let (code, body) = match path {
        "/healthz" => (200, "ok\n".to_owned()),
        "/ready" => match ready_file {
            Some(f) if !std::path::Path::new(f).exists() => (503, "not ready\n".to_owned()),
            _ => (200, "ready\n".to_owned()),
        },
        "/env" => {
            let mut vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            vars.sort();
            (200, vars.join("\n") + "\n")
        }
        "/args" => (
            200,
            std::env::args()
                .skip(1)
                .map(|a| a + "\n")
                .collect::<String>(),
        ),
        "/pid" => (200, format!("{}\n", std::process::id())),
        "/file" => match param("path").map(std::fs::read_to_string) {
            Some(Ok(text)) => (200, text),
            Some(Err(e)) => (404, format!("{e}\n")),
            None => (400, "missing path\n".to_owned()),
        },
        "/exit" => {
            let c: i32 = param("code").and_then(|c| c.parse().ok()).unwrap_or(1);
            exit = Some(c);
            (200, format!("exiting with {c}\n"))
        }
        _ => (404, "not found\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let _ = write!(
        stream,
        "HTTP/1.0 {code} {reason}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
    if let Some(c) = exit {
        eprintln!("kubederp-test-container exiting with {c} on request");
        std::process::exit(c);
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes.get(i).copied().unwrap_or_default();
        if b == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
