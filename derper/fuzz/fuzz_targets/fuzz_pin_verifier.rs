//! The pinned-certificate check (`derper::pin`, issue 15 finding 1) over generated chains.
//!
//! Input: `[mode][rest]`, mode % 3:
//!
//! * 0: arbitrary DER. `rest` = `[pin: u8][time: u8][name: u8][count: u8]` then up to 5
//!   certificates `[len: 2][der]`; the first is the end entity. The pin is that of the end
//!   entity (pin byte odd) or of the pool's pinned certificate.
//! * 1: structured chains from a pool: the pinned leaf, a real metacert, an attacker cert
//!   whose CN looks like a metacert, one with `derpkey` outside its CN, a real leaf whose
//!   hostname contains `derpkey`, an expired leaf and a metacert-like cert with a 16-bit
//!   serial. `rest` = `[pin][end entity][count][indexes…][flip at: 2][flip xor][time][name]`;
//!   one byte of one certificate may be flipped.
//! * 2: `rest` is a pin string for `Pin::parse`.
//!
//! Properties: an accepted chain's end entity hashes to the pin, every other certificate is a
//! metacert (CN `derpkey` + 64 hex, 8-bit serial, read independently with x509-parser), the
//! time is inside the end entity's validity and a dialed DNS name is one of its SAN names
//! (case and a trailing dot aside). The honest chain — the pinned leaf, real metacerts after
//! it, a time inside its validity, its name or an IP literal — is accepted. A pin string
//! parses only in its canonical form.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use derper::pin::{Pin, check_chain};
use derper_fuzz::Take;
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls::pki_types::UnixTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const HOST: &str = "derp.example.com";
const DERPKEY_HOST: &str = "derpkey.example.com";
const NAMES: [Option<&str>; 6] = [
    None,
    Some(HOST),
    Some(DERPKEY_HOST),
    Some("other.example.com"),
    Some("DERP.example.com."),
    Some("derpkey0000000000000000000000000000000000000000000000000000000000000000"),
];
/// 2026-12-06, inside the pool leaves' validity (2020–2040).
const NOW: u64 = 1_796_515_200;

/// Indexes into the pool.
const PINNED: usize = 0;
const METACERT: usize = 1;

fn cert(
    cn: &str,
    sans: &[&str],
    years: (i32, i32),
    serial: Option<u64>,
    org: Option<&str>,
) -> Vec<u8> {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    p.not_before = rcgen::date_time_ymd(years.0, 1, 1);
    p.not_after = rcgen::date_time_ymd(years.1, 1, 1);
    if let Some(s) = serial {
        p.serial_number = Some(s.into());
    }
    p.self_signed(&KeyPair::generate().expect("key"))
        .expect("cert")
        .der()
        .to_vec()
}

fn pool() -> &'static [Vec<u8>] {
    static POOL: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let hexkey = "ab".repeat(32);
        vec![
            cert(HOST, &[HOST], (2020, 2040), None, None),
            derper::tls::metacert(&[0xab; 32])
                .expect("metacert")
                .to_vec(),
            cert(
                &format!("derpkey{hexkey}"),
                &[HOST],
                (2020, 2040),
                Some(2),
                None,
            ),
            cert(
                HOST,
                &[HOST, DERPKEY_HOST],
                (2020, 2040),
                None,
                Some(&format!("derpkey{hexkey}")),
            ),
            cert(DERPKEY_HOST, &[DERPKEY_HOST], (2020, 2040), None, None),
            cert(HOST, &[HOST], (2000, 2001), None, None),
            cert(
                &format!("derpkey{hexkey}"),
                &[],
                (2020, 2040),
                Some(300),
                None,
            ),
        ]
    })
}

/// Metacert as Tailscale clients read it: CN `derpkey` + 64 hex digits, serial < 256.
fn is_metacert(der: &[u8]) -> bool {
    let Ok((_, c)) = X509Certificate::from_der(der) else {
        return false;
    };
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok());
    let key_ok = cn
        .and_then(|cn| cn.strip_prefix("derpkey"))
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    key_ok && c.raw_serial().iter().skip_while(|b| **b == 0).count() <= 1
}

/// Validity (unix seconds) and lowercase SAN DNS names of a certificate.
fn facts(der: &[u8]) -> Option<(i64, i64, Vec<String>)> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    let v = c.validity();
    let names = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((v.not_before.timestamp(), v.not_after.timestamp(), names))
}

fn time(sel: u8, ee: &[u8], t: &mut Take<'_>) -> u64 {
    let (nb, na) = facts(ee).map_or((0, 0), |(a, b, _)| (a, b));
    let clamp = |x: i64| u64::try_from(x).unwrap_or(0);
    match sel % 6 {
        0 => NOW,
        1 => clamp(nb),
        2 => clamp(na),
        3 => clamp(nb - 1),
        4 => clamp(na + 1),
        _ => t.u64() >> 16,
    }
}

/// Checks the chain and the properties every verdict must have; returns the verdict.
fn check(pin: &Pin, chain: &[Vec<u8>], name: Option<&str>, now: u64) -> bool {
    let Some((ee, rest)) = chain.split_first() else {
        let empty: [&[u8]; 0] = [];
        assert!(
            check_chain(
                pin,
                &[],
                &empty,
                name,
                UnixTime::since_unix_epoch(Duration::from_secs(now))
            )
            .is_err()
        );
        return false;
    };
    let intermediates: Vec<&[u8]> = rest.iter().map(Vec::as_slice).collect();
    let ok = check_chain(
        pin,
        ee,
        &intermediates,
        name,
        UnixTime::since_unix_epoch(Duration::from_secs(now)),
    )
    .is_ok();
    if ok {
        assert!(
            pin.matches(ee),
            "accepted an end entity that is not the pinned certificate"
        );
        for (i, c) in rest.iter().enumerate() {
            assert!(
                is_metacert(c),
                "accepted certificate {} which is not a metacert",
                i + 1
            );
        }
        let (nb, na, names) = facts(ee).expect("an accepted end entity parses");
        let now = i64::try_from(now).expect("i64");
        assert!(
            nb <= now && now <= na,
            "accepted outside the validity period"
        );
        if let Some(n) = name {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            assert!(
                names.iter().any(|s| s.trim_end_matches('.') == n
                    || (s.starts_with("*.")
                        && n.split_once('.')
                            .is_some_and(|(l, r)| !l.is_empty() && r == &s[2..]))),
                "accepted for {n:?}, not in {names:?}"
            );
        }
    }
    ok
}

fuzz_target!(|input: &[u8]| {
    let mut t = Take(input);
    let pool = pool();
    match t.u8() % 3 {
        0 => {
            let (pin_sel, time_sel, name_sel) = (t.u8(), t.u8(), t.u8());
            let count = usize::from(t.u8() % 6);
            let chain: Vec<Vec<u8>> = (0..count)
                .map(|_| {
                    let n = usize::from(t.u16());
                    t.bytes(n).to_vec()
                })
                .collect();
            let ee = chain.first().map_or(&[][..], Vec::as_slice);
            let pin = if pin_sel & 1 == 1 {
                Pin::of_der(ee)
            } else {
                Pin::of_der(&pool[PINNED])
            };
            let now = time(time_sel, ee, &mut t);
            check(
                &pin,
                &chain,
                NAMES[usize::from(name_sel) % NAMES.len()],
                now,
            );
        }
        1 => {
            let pin_sel = usize::from(t.u8()) % (pool.len() + 1);
            let ee_sel = usize::from(t.u8()) % pool.len();
            let count = usize::from(t.u8() % 5);
            let mut idx = vec![ee_sel];
            idx.extend((0..count).map(|_| usize::from(t.u8()) % pool.len()));
            let mut chain: Vec<Vec<u8>> = idx.iter().map(|&i| pool[i].clone()).collect();
            let flip_at = usize::from(t.u16());
            let flip = t.u8();
            let flipped = flip != 0;
            if flipped {
                let which = (flip_at >> 12) % chain.len();
                let c = &mut chain[which];
                let at = flip_at % c.len();
                c[at] ^= flip;
            }
            let time_sel = t.u8();
            let name = NAMES[usize::from(t.u8()) % NAMES.len()];
            let pin = match pool.get(pin_sel) {
                Some(c) => Pin::of_der(c),
                None => Pin::parse_hex(&hex_of(&t.array::<32>())).expect("pin"),
            };
            let now = time(time_sel, &chain[0], &mut t);
            let ok = check(&pin, &chain, name, now);
            let honest = !flipped
                && pin_sel == PINNED
                && ee_sel == PINNED
                && idx[1..].iter().all(|&i| i == METACERT)
                && (NAMES[0] == name || name == Some(HOST))
                && matches!(time_sel % 6, 0..=2);
            if honest {
                assert!(
                    ok,
                    "the honest chain was refused (name {name:?}, time {now})"
                );
            }
        }
        _ => {
            let s = String::from_utf8_lossy(t.rest());
            if let Ok(pin) = Pin::parse(&s) {
                assert_eq!(
                    pin.to_string(),
                    s,
                    "a pin parsed from a non-canonical string"
                );
                assert_eq!(Pin::parse(&pin.to_string()), Ok(pin));
            }
        }
    }
});

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
