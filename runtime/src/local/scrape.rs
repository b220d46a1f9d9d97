//! Reading a node's HTTP endpoints from outside: a plain HTTP/1.1 GET and the few Prometheus
//! text lookups `partita local` (its status lines) and the tests need.

use std::time::Duration;

/// `GET path` on `addr` over plain HTTP/1.1: (status, body). `None` if nothing listens yet.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// The value of the series `name{labels...}` in a Prometheus text exposition (labels may be a
/// subset of the series' labels).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series(text, name)
        .find(|(rest, _)| labels.iter().all(|(k, v)| label(rest, k) == Some(*v)))
        .map(|(_, value)| value)
}

/// Every series of `name`: (its labels as written, `k="v",...`; its value).
pub fn series<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(move |line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name).then(|| value.parse().ok().map(|v| (rest.trim_end_matches('}'), v))).flatten()
    })
}

/// The value of label `key` in a series' labels (`k="v",...`; values without quotes or commas).
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
}
