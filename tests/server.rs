//! `absorb serve` as systemd runs it: the real binary on the real bundle, a NOTIFY_SOCKET datagram
//! socket, port 0, and a tiny HTTP/1.1 client over `TcpStream` (no client library). Checks
//! readiness after warm-up, byte equality with the CLI, 4xx JSON errors naming the field for
//! every kind of bad request, the SIGTERM drain, 429 under overload, hung-up clients not keeping
//! the worker busy, and memory over a few hundred requests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use absorb::image::{png_bytes, Pixels};
use base64::Engine as _;
use common::{absorb, model_arg, stderr};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A running `absorb serve`, killed if a test fails before stopping it.
struct Server {
    child: Child,
    addr: String,
    /// Datagrams received on the notify socket so far (a thread keeps reading, as systemd does).
    messages: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the service on port 0 with a notify socket and waits for READY=1.
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let inbox = messages.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = notify.recv(&mut buf) {
                inbox
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        let mut child = common::absorb_command()
            .args(["serve", "-m", &model_arg(), "--listen", "127.0.0.1:0", "--threads", "1"])
            .args(extra)
            .env("NOTIFY_SOCKET", &sock)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start absorb serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let (err, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            messages,
            log,
            _dir: dir,
        };
        server.wait_for("READY=1");
        server.addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a `listening on ADDR` line");
        server
    }

    /// Waits (up to two minutes) until a datagram contains `needle`.
    fn wait_for(&self, needle: &str) {
        let start = Instant::now();
        while !self.notified().iter().any(|m| m.contains(needle)) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no {needle:?} from the service; got {:?}",
                self.notified()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn notified(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn post(&self, path: &str, body: &str) -> Reply {
        http(&self.addr, "POST", path, body.as_bytes())
    }

    fn get(&self, path: &str) -> Reply {
        http(&self.addr, "GET", path, b"")
    }

    /// A value from /metrics (series name with labels, exactly as printed).
    fn metric(&self, series: &str) -> f64 {
        let text = String::from_utf8(self.get("/metrics").body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit; returns its exit code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < within,
                "no exit within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set now, in KiB.
    fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// The peak resident set since the service started, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    fn proc_status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- absorb serve log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    let minutes = if common::under_runner() { 30 } else { 2 };
    s.set_read_timeout(Some(Duration::from_secs(60 * minutes))).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    // One write (no Nagle wait between head and body). A server that answers early (413) may
    // stop reading; the answer is still there to read.
    let _ = s.write_all(&request);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let (mut out, mut rest) = (Vec::new(), &body[..]);
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        body = out;
    }
    Reply { status, headers, body }
}

/// A gray PNG of `w`x`h` whose pixels are `f(x, y)`.
fn png(w: usize, h: usize, f: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let data = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| f(x, y))
        .collect();
    png_bytes(
        &Pixels {
            channels: 1,
            height: h,
            width: w,
            data,
        },
        None,
    )
    .unwrap()
}

/// The bundle's image side and token count, from /v1/model.
fn shape(s: &Server) -> (usize, usize) {
    let m = s.get("/v1/model").json();
    let side = m["bundle"]["manifest"]["image"]["width"].as_u64().unwrap() as usize;
    let t = &m["bundle"]["manifest"]["tokens"];
    (
        side,
        (t["height"].as_u64().unwrap() * t["width"].as_u64().unwrap()) as usize,
    )
}

fn cli(dir: &Path, args: &[&str]) {
    let o = absorb(dir, args);
    assert!(o.status.success(), "absorb {args:?}: {}", stderr(&o));
}

#[test]
fn serve_is_ready_after_warm_up_and_answers_with_the_cli_bytes() {
    let mut s = Server::start(&[], &[("WATCHDOG_USEC", "200000")]);
    let messages = s.notified();
    let ready = messages.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(messages[..ready].iter().any(|m| m.contains("STATUS=")), "{messages:?}");
    let log = s.log();
    let warm = log.find("warm-up generation took").expect("a warm-up ran");
    assert!(
        warm < log.find("listening on").unwrap(),
        "warm-up before listening:\n{log}"
    );
    s.wait_for("WATCHDOG=1");

    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    // count 1: the PNG itself, the CLI's `--count 1 -o x.png`.
    let one = s.post("/v1/generate", r#"{"seed": 7}"#);
    assert_eq!(one.status, 200, "{}", String::from_utf8_lossy(&one.body));
    assert_eq!(one.header("content-type"), Some("image/png"));
    assert_eq!(one.header("x-absorb-seed"), Some("7"));
    cli(
        d.path(),
        &["generate", "-m", &m, "--seed", "7", "--count", "1", "-o", "x.png"],
    );
    assert!(
        one.body == std::fs::read(d.path().join("x.png")).unwrap(),
        "service PNG != CLI PNG"
    );

    // count 3 with settings: JSON, image i = the CLI's directory output for index i.
    let many = s.post(
        "/v1/generate",
        r#"{"seed": 5, "count": 3, "steps": 5, "temperature": 0.9}"#,
    );
    assert_eq!(many.status, 200);
    let j = many.json();
    assert_eq!((j["seed"].as_u64(), j["steps"].as_u64()), (Some(5), Some(5)));
    let images = j["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    cli(
        d.path(),
        &[
            "generate", "-m", &m, "--seed", "5", "--count", "3", "--steps", "5", "-t", "0.9", "-o", "many/",
        ],
    );
    for (i, img) in images.iter().enumerate() {
        let file = d.path().join(format!("many/5-{i:06}.png"));
        assert!(
            B64.decode(img.as_str().unwrap()).unwrap() == std::fs::read(&file).unwrap(),
            "image {i}"
        );
    }

    // Another sampler with a temperature schedule: the CLI's `--sampler maskgit -t 1.2:0.6`.
    let mg = s.post(
        "/v1/generate",
        r#"{"seed": 9, "sampler": "maskgit", "temperature": 1.2, "temperature_end": 0.6}"#,
    );
    assert_eq!(mg.status, 200, "{}", String::from_utf8_lossy(&mg.body));
    assert_eq!(mg.header("x-absorb-sampler"), Some("maskgit"));
    cli(
        d.path(),
        &[
            "generate",
            "-m",
            &m,
            "--seed",
            "9",
            "--sampler",
            "maskgit",
            "-t",
            "1.2:0.6",
            "-o",
            "mg.png",
        ],
    );
    assert!(
        mg.body == std::fs::read(d.path().join("mg.png")).unwrap(),
        "maskgit: service PNG != CLI PNG"
    );
    // Nucleus sampling: the CLI's `--top-p 0.6`, echoed in a header.
    let tp = s.post("/v1/generate", r#"{"seed": 9, "steps": 8, "top_p": 0.6}"#);
    assert_eq!(tp.status, 200, "{}", String::from_utf8_lossy(&tp.body));
    assert_eq!(tp.header("x-absorb-top-p"), Some("0.6"));
    cli(
        d.path(),
        &[
            "generate", "-m", &m, "--seed", "9", "--steps", "8", "--top-p", "0.6", "-o", "tp.png",
        ],
    );
    assert!(
        tp.body == std::fs::read(d.path().join("tp.png")).unwrap(),
        "top_p: service PNG != CLI PNG"
    );
    // A class by name or index: the CLI's `--class 7`.
    cli(
        d.path(),
        &["generate", "-m", &m, "--seed", "9", "--class", "7", "-o", "seven.png"],
    );
    for body in [r#"{"seed": 9, "class": "7"}"#, r#"{"seed": 9, "class": 7}"#] {
        let c = s.post("/v1/generate", body);
        assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
        assert!(
            c.body == std::fs::read(d.path().join("seven.png")).unwrap(),
            "{body}: service PNG != CLI PNG"
        );
    }

    // vary: one variation (a PNG with its strength in a header) and a sheet's worth (JSON), each
    // the CLI's bytes; the source is the service's own PNG, as the page sends it.
    let source = B64.encode(&one.body);
    let v = s.post(
        "/v1/vary",
        &format!(r#"{{"image": "{source}", "strength": 0.3, "seed": 4, "steps": 8}}"#),
    );
    assert_eq!(v.status, 200, "{}", String::from_utf8_lossy(&v.body));
    assert_eq!(v.header("x-absorb-strength"), Some("0.3"));
    cli(
        d.path(),
        &[
            "vary",
            "-m",
            &m,
            "--image",
            "x.png",
            "--strength",
            "0.3",
            "--seed",
            "4",
            "--steps",
            "8",
            "-o",
            "v.png",
        ],
    );
    assert!(
        v.body == std::fs::read(d.path().join("v.png")).unwrap(),
        "vary: service PNG != CLI PNG"
    );
    let vs = s.post(
        "/v1/vary",
        &format!(r#"{{"image": "{source}", "strength": 0.3, "seed": 4, "steps": 8, "count": 2}}"#),
    );
    assert_eq!(vs.status, 200, "{}", String::from_utf8_lossy(&vs.body));
    let j = vs.json();
    assert_eq!(j["strength"].as_f64().map(|x| (x * 10.0).round()), Some(3.0), "{j}");
    let images = j["images"].as_array().unwrap();
    assert!(
        B64.decode(images[0].as_str().unwrap()).unwrap() == v.body,
        "variation 0 of 2 == the single one"
    );
    cli(
        d.path(),
        &[
            "vary",
            "-m",
            &m,
            "--image",
            "x.png",
            "--strength",
            "0.3",
            "--seed",
            "4",
            "--steps",
            "8",
            "--first-index",
            "1",
            "-o",
            "v1.png",
        ],
    );
    assert!(
        B64.decode(images[1].as_str().unwrap()).unwrap() == std::fs::read(d.path().join("v1.png")).unwrap(),
        "variation 1: service PNG != CLI PNG"
    );

    // inpaint: a rectangle, and the same region as a mask PNG, both = the CLI's bytes.
    let (side, _) = shape(&s);
    let rect = format!("{},0,{},{}", side / 2, side / 2, side);
    cli(
        d.path(),
        &[
            "inpaint", "-m", &m, "--image", "x.png", "--rect", &rect, "--seed", "3", "-o", "e.png",
        ],
    );
    let expected = std::fs::read(d.path().join("e.png")).unwrap();
    let image = B64.encode(&one.body);
    let by_rect = s.post(
        "/v1/inpaint",
        &format!(r#"{{"image": "{image}", "rect": [{rect}], "seed": 3}}"#),
    );
    assert_eq!(by_rect.status, 200, "{}", String::from_utf8_lossy(&by_rect.body));
    assert!(by_rect.body == expected, "inpaint by rect != CLI");
    let mask = B64.encode(png(side, side, |x, _| if x >= side / 2 { 255 } else { 0 }));
    let by_mask = s.post(
        "/v1/inpaint",
        &format!(r#"{{"image": "{image}", "mask": "{mask}", "seed": 3}}"#),
    );
    assert!(
        by_mask.status == 200 && by_mask.body == expected,
        "inpaint by mask != CLI"
    );

    let model = s.get("/v1/model").json();
    assert_eq!(model["provider"], "cpu");
    assert!(
        model["onnxruntime"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.")),
        "{model}"
    );
    assert!(model["bundle"]["manifest"]["name"].is_string());
    assert_eq!(s.get("/healthz").json()["status"], "ok");
    assert_eq!(
        s.metric(r#"absorb_requests_total{route="/v1/generate",status="200"}"#),
        6.0
    );
    assert_eq!(
        s.metric(r#"absorb_requests_total{route="/v1/inpaint",status="200"}"#),
        2.0
    );
    assert_eq!(s.metric(r#"absorb_requests_total{route="/v1/vary",status="200"}"#), 2.0);
    // 10 generated and edited, 3 variations.
    assert_eq!(s.metric("absorb_images_total"), 13.0);
    assert!(s.metric(r#"absorb_request_duration_seconds_count{route="/v1/generate"}"#) >= 2.0);
    assert!(s.metric("absorb_images_per_second") > 0.0);

    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0), "{}", s.log());
    s.wait_for("STOPPING=1");
}

#[test]
fn concurrent_requests_with_equal_settings_share_transformer_calls_and_keep_their_bytes() {
    let s = Server::start(&[], &[]);
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let calls_before = s.metric("absorb_transformer_calls_total");
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let (addr, barrier) = (s.addr.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                http(
                    &addr,
                    "POST",
                    "/v1/generate",
                    format!(r#"{{"seed": {}}}"#, 100 + i).as_bytes(),
                )
            })
        })
        .collect();
    let together: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let calls_together = s.metric("absorb_transformer_calls_total") - calls_before;
    let alone: Vec<Reply> = (0..n)
        .map(|i| s.post("/v1/generate", &format!(r#"{{"seed": {}}}"#, 100 + i)))
        .collect();
    let calls_alone = s.metric("absorb_transformer_calls_total") - calls_before - calls_together;
    for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
        assert_eq!((a.status, b.status), (200, 200), "request {i}");
        assert!(
            a.body == b.body,
            "seed {}: batched bytes differ from a lone request",
            100 + i
        );
    }
    println!("transformer calls for {n} requests: {calls_together} concurrent, {calls_alone} one at a time");
    assert!(
        calls_together < calls_alone,
        "{calls_together} vs {calls_alone}: no batching"
    );
}

/// The bad-request table: `METHOD PATH BODY => STATUS FIELD NEEDLE;` per line.
macro_rules! cases {
    ($($method:literal $path:literal $body:expr => $status:literal $field:literal $needle:literal;)*) => {
        vec![$(($method, $path, String::from($body), $status as u16, $field, $needle)),*]
    };
}

#[test]
fn bad_requests_get_a_4xx_json_error_naming_the_field() {
    let s = Server::start(&["--max-body", "8192", "--max-count", "4"], &[]);
    let (side, tokens) = shape(&s);
    let good = B64.encode(png(side, side, |x, y| ((x * 7 + y * 3) % 256) as u8));
    let small = B64.encode(png(side / 2, side / 2, |_, _| 255));
    let black = B64.encode(png(side, side, |_, _| 0));
    let mut truncated = png(side, side, |x, _| x as u8);
    truncated.truncate(truncated.len() / 2);
    let truncated = B64.encode(truncated);
    let garbage = B64.encode(b"\x89PNG\r\n\x1a\nthis is not a png at all");
    let not_png = B64.encode(b"GIF89a definitely not a png");
    let r = format!("{}", side / 2);
    // One case a line: METHOD PATH BODY => STATUS FIELD (empty: none) NEEDLE (in the error).
    let cases = cases! {
        "POST" "/v1/generate" "{" => 400 "body" "malformed JSON";
        "POST" "/v1/generate" r#"{"seed": 1,}"# => 400 "body" "malformed JSON";
        "POST" "/v1/generate" r#"{"seed": 1} {"seed": 2}"# => 400 "body" "malformed JSON";
        "POST" "/v1/generate" r#""hello""# => 400 "body" "invalid";
        "POST" "/v1/generate" r#"{"seed": 1, "colour": 2}"# => 400 "colour" "unknown field";
        "POST" "/v1/generate" r#"{"steps": 0}"# => 400 "steps" "out of range";
        "POST" "/v1/generate" format!(r#"{{"steps": {}}}"#, tokens + 1) => 400 "steps" "out of range";
        "POST" "/v1/generate" r#"{"steps": "many"}"# => 400 "steps" "invalid type";
        "POST" "/v1/generate" r#"{"class": 10}"# => 400 "class" "is not a class of this model";
        "POST" "/v1/generate" r#"{"class": "seven"}"# => 400 "class" "is not a class of this model";
        "POST" "/v1/generate" r#"{"class": [1]}"# => 400 "class" "neither a class name";
        "POST" "/v1/generate" r#"{"class": -1}"# => 400 "class" "neither a class name";
        "POST" "/v1/generate" r#"{"temperature": 0}"# => 400 "temperature" "out of range";
        "POST" "/v1/generate" r#"{"temperature": -1}"# => 400 "temperature" "out of range";
        "POST" "/v1/generate" r#"{"temperature": 1e300}"# => 400 "temperature" "out of range";
        "POST" "/v1/generate" r#"{"sampler": "best"}"# => 400 "sampler" "unknown variant";
        "POST" "/v1/generate" r#"{"temperature_end": 0}"# => 400 "temperature_end" "out of range";
        "POST" "/v1/generate" r#"{"top_p": 1.5}"# => 400 "top_p" "out of range";
        "POST" "/v1/generate" r#"{"top_p": 0}"# => 400 "top_p" "out of range";
        "POST" "/v1/generate" r#"{"sampler": "threshold", "threshold": 1.5}"# => 400 "threshold" "out of range";
        "POST" "/v1/generate" r#"{"sampler": "maskgit", "threshold": 0.5}"# => 400 "threshold" "only the threshold samplers";
        "POST" "/v1/generate" r#"{"cache": 0}"# => 400 "cache" "out of range";
        "POST" "/v1/generate" r#"{"cache": "sometimes"}"# => 400 "cache" "not a cache mode";
        "POST" "/v1/generate" r#"{"cache": -3}"# => 400 "cache" "not a cache mode";
        "POST" "/v1/generate" r#"{"cache": 4, "grid": [8, 16]}"# => 400 "cache" "own 8x8 token grid";
        "POST" "/v1/generate" r#"{"count": 0}"# => 400 "count" "1..=4";
        "POST" "/v1/generate" r#"{"count": 5}"# => 400 "count" "1..=4";
        "POST" "/v1/generate" r#"{"seed": -1}"# => 400 "seed" "u64";
        "POST" "/v1/generate" r#"{"seed": 1.5}"# => 400 "seed" "u64";
        "POST" "/v1/generate" r#"{"seed": 18446744073709551616}"# => 400 "seed" "u64";
        "POST" "/v1/generate" format!(r#"{{"seed": 1, "pad": "{}"}}"#, "x".repeat(9000)) => 413 "body" "8192 bytes";
        "POST" "/v1/inpaint" "{}" => 400 "body" "missing field `image`";
        "POST" "/v1/inpaint" r#"{"image": "!!!", "rect": [0, 0, 4, 4]}"# => 400 "image" "base64";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{not_png}", "rect": [0, 0, 4, 4]}}"#) => 400 "image" "not a PNG";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{garbage}", "rect": [0, 0, 4, 4]}}"#) => 400 "image" "not a readable PNG";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{truncated}", "rect": [0, 0, 4, 4]}}"#) => 400 "image" "PNG";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{small}", "rect": [0, 0, 4, 4]}}"#) => 400 "image" "resize";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "mask": "{small}"}}"#) => 400 "mask" "mask is";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "mask": "{not_png}"}}"#) => 400 "mask" "not a PNG";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "mask": "{black}"}}"#) => 400 "mask" "empty";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}"}}"#) => 400 "mask" "exactly one";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "mask": "{black}", "rect": [0, 0, 4, 4]}}"#) => 400 "mask" "exactly one";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "rect": [{r}, 0, {side}, 4]}}"#) => 400 "rect" "inside";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "rect": [0, 0, 0, 4]}}"#) => 400 "rect" "non-empty";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "rect": [0, 0, 4]}}"#) => 400 "rect" "invalid";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "rect": [0, 0, 4, 4], "decode_all": "yes"}}"#) => 400 "decode_all" "invalid type";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "rect": [0, 0, 4, 4], "steps": 0}}"#) => 400 "steps" "out of range";
        "POST" "/v1/inpaint" format!(r#"{{"image": "{good}", "rect": [0, 0, 4, 4], "count": 5}}"#) => 400 "count" "1..=4";
        // Larger grids, outpainting and previews.
        "POST" "/v1/generate" r#"{"grid": [8, 400]}"# => 400 "grid" "limit of 32";
        "POST" "/v1/generate" r#"{"grid": [4, 16]}"# => 400 "grid" "smaller than the trained";
        "POST" "/v1/generate" r#"{"grid": [8, 16], "stride": [8, 0]}"# => 400 "stride" "out of range";
        "POST" "/v1/generate" r#"{"stride": [4, 4]}"# => 400 "grid" "give \"grid\"";
        "POST" "/v1/generate" r#"{"frames": "jpeg"}"# => 400 "frames" "unknown variant";
        "POST" "/v1/generate" r#"{"grid": [8, 16], "count": 2, "frames": "gif"}"# => 400 "frames" "one image at a time";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{good}", "extend": {{"right": 3}}}}"#) => 400 "extend" "multiple of";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{good}", "extend": {{}}}}"#) => 400 "extend" "nothing to extend";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{good}", "extend": {{"back": 4}}}}"#) => 400 "extend.back" "unknown field";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{small}", "extend": {{"right": 8}}}}"#) => 400 "image" "at least";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{good}", "extend": {{"right": 4000}}}}"#) => 400 "extend" "above the limit of";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{good}", "extend": {{"right": 8}}, "outpaint_edge": 4}}"#) => 400 "outpaint_edge" "less than half the trained grid";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{good}", "extend": {{"right": 8}}, "outpaint_edge": 18446744073709551615}}"#) => 400 "outpaint_edge" "less than half the trained grid";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{good}", "extend": {{"right": 8}}, "outpaint_edge": -1}}"#) => 400 "outpaint_edge" "invalid value";
        "POST" "/v1/outpaint" format!(r#"{{"image": "{garbage}", "extend": {{"right": 8}}}}"#) => 400 "image" "not a readable PNG";
        // Variations.
        "POST" "/v1/vary" "{}" => 400 "body" "missing field `image`";
        "POST" "/v1/vary" format!(r#"{{"image": "{good}", "strength": 0}}"#) => 400 "strength" "not in (0, 1]";
        "POST" "/v1/vary" format!(r#"{{"image": "{good}", "strength": 1.5}}"#) => 400 "strength" "not in (0, 1]";
        "POST" "/v1/vary" format!(r#"{{"image": "{good}", "strength": "half"}}"#) => 400 "strength" "invalid type";
        "POST" "/v1/vary" format!(r#"{{"image": "{good}", "count": 5}}"#) => 400 "count" "1..=4";
        "POST" "/v1/vary" format!(r#"{{"image": "{small}"}}"#) => 400 "image" "resize";
        "POST" "/v1/vary" format!(r#"{{"image": "{garbage}"}}"#) => 400 "image" "not a readable PNG";
        "POST" "/v1/vary" format!(r#"{{"image": "{good}", "mask": "{good}"}}"#) => 400 "mask" "unknown field";
        "POST" "/v1/jobs?type=paint" "{}" => 400 "type" "generate, inpaint, outpaint or vary";
        "GET" "/v1/generate" "" => 405 "" "method not allowed";
        "POST" "/v1/model" "" => 405 "" "method not allowed";
        "GET" "/v2/generate" "" => 404 "" "no such route";
    };
    for (method, path, body, status, field, needle) in &cases {
        let r = http(&s.addr, method, path, body.as_bytes());
        let shown = &body[..body.len().min(120)];
        assert_eq!(
            r.status,
            *status,
            "{method} {path} {shown}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let j = r.json();
        let error = j["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} {shown}: no error in {j}"));
        assert!(
            error.contains(needle),
            "{method} {path} {shown}: {error:?} lacks {needle:?}"
        );
        if !field.is_empty() {
            assert_eq!(j["field"], *field, "{method} {path} {shown}: {j}");
        }
    }
    // Still healthy, still generating, and nothing panicked.
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(
        s.post("/v1/generate", "").status,
        200,
        "an empty body means all defaults"
    );
    assert_eq!(
        s.metric(r#"absorb_requests_total{route="/v1/generate",status="500"}"#),
        0.0
    );
    assert!(!s.log().contains("panicked"), "{}", s.log());
}

#[test]
fn sigterm_finishes_every_accepted_request_then_exits_zero() {
    // A deadline far beyond the work: every request must be finished, none cut at 503.
    let mut s = Server::start(&["--max-batch", "1", "--drain-timeout-ms", "120000"], &[]);
    let (_, tokens) = shape(&s);
    let clients = in_flight(&s, 6, &format!(r#""count": 8, "steps": {tokens}"#));
    s.sigterm();
    s.wait_for("STOPPING=1");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        TcpStream::connect(&s.addr).is_err(),
        "no new connections are accepted while draining"
    );
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["images"].as_array().unwrap().len(), 8, "request {i}");
    }
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0), "{}", s.log());
}

#[test]
fn overload_is_answered_429_with_retry_after_and_never_5xx() {
    let s = Server::start(&["--max-queue", "1", "--max-batch", "1"], &[]);
    let (_, tokens) = shape(&s);
    let n = 10;
    let barrier = Arc::new(Barrier::new(n));
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let (addr, barrier) = (s.addr.clone(), barrier.clone());
            let body = format!(r#"{{"seed": {i}, "count": 4, "steps": {tokens}}}"#);
            std::thread::spawn(move || {
                barrier.wait();
                http(&addr, "POST", "/v1/generate", body.as_bytes())
            })
        })
        .collect();
    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert!(statuses.iter().all(|&c| c == 200 || c == 429), "{statuses:?}");
    assert!(
        statuses.contains(&200),
        "the first request is always taken: {statuses:?}"
    );
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(!busy.is_empty(), "{statuses:?}");
    for r in busy {
        let after: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&after));
        assert!(r.json()["error"].as_str().unwrap().contains("queue is full"));
    }
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn a_client_that_hangs_up_does_not_keep_the_worker_busy() {
    let s = Server::start(&["--max-batch", "1"], &[]);
    let (_, tokens) = shape(&s);
    let long = format!(r#"{{"seed": 1, "count": 8, "steps": {tokens}}}"#);
    let (addr, body) = (s.addr.clone(), long.clone());
    let first = std::thread::spawn(move || http(&addr, "POST", "/v1/generate", body.as_bytes()));
    // Four more identical requests whose clients hang up right after sending them.
    while s.metric("absorb_requests_in_flight") < 1.0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    for _ in 0..4 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        let head = format!(
            "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{long}",
            long.len()
        );
        c.write_all(head.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        c.shutdown(Shutdown::Both).unwrap();
    }
    assert_eq!(first.join().unwrap().status, 200);
    let start = Instant::now();
    while s.metric("absorb_requests_cancelled_total") < 4.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "hang-ups not noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.post("/v1/generate", r#"{"seed": 2}"#).status, 200);
    let images = s.metric("absorb_images_total");
    assert!(
        images < 8.0 * 5.0,
        "hung-up requests were sampled anyway: {images} images"
    );
    assert!(s.metric("absorb_jobs_skipped_total") >= 1.0);
}

#[test]
fn a_request_not_answered_in_time_gets_503_and_stops_using_the_worker() {
    let s = Server::start(&["--max-batch", "1", "--timeout-ms", "30"], &[]);
    let (_, tokens) = shape(&s);
    let r = s.post(
        "/v1/generate",
        &format!(r#"{{"seed": 1, "count": 16, "steps": {tokens}}}"#),
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("not answered within 30 ms"));
    let start = Instant::now();
    while s.metric("absorb_jobs_skipped_total") < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the timed-out job ran to the end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(s.metric("absorb_images_total") < 16.0);
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn a_few_hundred_requests_leave_memory_flat() {
    let s = Server::start(&[], &[]);
    let (side, _) = shape(&s);
    let image = B64.encode(png(side, side, |x, y| ((x + y) * 4) as u8));
    let inpaint = format!(
        r#"{{"image": "{image}", "rect": [0, 0, {}, {}], "seed": 1}}"#,
        side / 2,
        side
    );
    let round = |i: usize| {
        let r = match i % 10 {
            0 => s.post("/v1/inpaint", &inpaint),
            1 => s.post("/v1/generate", r#"{"steps": "bad"}"#),
            2 => s.post("/v1/generate", &format!(r#"{{"seed": {i}, "count": 4}}"#)),
            _ => s.post("/v1/generate", &format!(r#"{{"seed": {i}}}"#)),
        };
        assert_eq!(r.status, if i % 10 == 1 { 400 } else { 200 }, "request {i}");
    };
    (0..50).for_each(round);
    let before = s.rss_kib();
    (50..350).for_each(round);
    let after = s.rss_kib();
    println!("RSS after 50 requests: {before} KiB; after 300 more: {after} KiB");
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 300 requests"
    );
}

/// `cargo test --release --test server -- --ignored --nocapture`: images/s and latency at 1 and
/// 8 concurrent clients, one image per request at the bundle's default steps.
#[test]
#[ignore]
fn throughput_and_latency_at_1_and_8_clients() {
    let s = Server::start(&["--max-queue", "64"], &[]);
    for clients in [1usize, 8] {
        let per_client = 400 / clients;
        let start = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let addr = s.addr.clone();
                std::thread::spawn(move || {
                    (0..per_client)
                        .map(|i| {
                            let t = Instant::now();
                            let body = format!(r#"{{"seed": {}}}"#, c * 100_000 + i);
                            assert_eq!(http(&addr, "POST", "/v1/generate", body.as_bytes()).status, 200);
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut lat: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let wall = start.elapsed();
        lat.sort();
        let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        println!(
            "{clients} clients: {} requests in {wall:.2?}: {:.1} images/s, p50 {:.1?}, p99 {:.1?}",
            lat.len(),
            lat.len() as f64 / wall.as_secs_f64(),
            q(0.50),
            q(0.99)
        );
    }
}

#[test]
fn larger_grids_outpainting_and_previews_answer_with_the_cli_bytes() {
    let s = Server::start(&[], &[]);
    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    // Two grids wide: the CLI's `--grid 8x16`.
    let wide = s.post("/v1/generate", r#"{"seed": 3, "grid": [8, 16]}"#);
    assert_eq!(wide.status, 200, "{}", String::from_utf8_lossy(&wide.body));
    assert_eq!(wide.header("content-type"), Some("image/png"));
    cli(
        d.path(),
        &["generate", "-m", &m, "--seed", "3", "--grid", "8x16", "-o", "wide.png"],
    );
    assert!(
        wide.body == std::fs::read(d.path().join("wide.png")).unwrap(),
        "wide PNG != CLI"
    );

    // A preview of two images: the CLI's `--count 2 --steps 8 --frames f.apng`.
    let r = s.post(
        "/v1/generate",
        r#"{"seed": 4, "count": 2, "steps": 8, "frames": "apng"}"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["frames_format"], "apng");
    cli(
        d.path(),
        &[
            "generate", "-m", &m, "--seed", "4", "--count", "2", "--steps", "8", "--frames", "f.apng", "-o", "g.png",
        ],
    );
    let frames = B64.decode(j["frames"].as_str().unwrap()).unwrap();
    assert!(
        frames == std::fs::read(d.path().join("f.apng")).unwrap(),
        "preview != CLI"
    );
    assert_eq!(j["images"].as_array().unwrap().len(), 2);

    // Outpainting a held-out digit 16 pixels to the right: the CLI's `outpaint --extend right=16`.
    let digit = &common::heldout()[4].0;
    let body = format!(
        r#"{{"image": "{}", "extend": {{"right": 16}}, "seed": 6}}"#,
        B64.encode(std::fs::read(digit).unwrap())
    );
    let r = s.post("/v1/outpaint", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let digit = digit.to_string_lossy();
    cli(
        d.path(),
        &[
            "outpaint", "-m", &m, "--image", &digit, "--extend", "right=16", "--seed", "6", "-o", "o.png",
        ],
    );
    assert!(
        r.body == std::fs::read(d.path().join("o.png")).unwrap(),
        "outpaint != CLI"
    );
    assert_eq!(
        s.metric(r#"absorb_requests_total{route="/v1/outpaint",status="200"}"#),
        1.0
    );
}

/// The exact bytes the service answers for fixed seeds (tests/golden/server-*.json): the
/// `golden_bytes_of_every_kind_of_output` cases of tests/cli.rs, as HTTP requests.
#[test]
fn golden_bytes_of_every_kind_of_answer() {
    // Under an emulator (`make goldens-avx2`) a request takes minutes, not the 60 s default.
    let slow: &[&str] = if common::under_runner() {
        &["--timeout-ms", "1800000"]
    } else {
        &[]
    };
    let s = Server::start(slow, &[]);
    let digit = B64.encode(std::fs::read(&common::heldout()[0].0).unwrap());
    let cases: Vec<(&str, &str, String)> = vec![
        ("generate", "/v1/generate", r#"{"seed": 7}"#.into()),
        ("grid", "/v1/generate", r#"{"seed": 7, "count": 4}"#.into()),
        (
            "maskgit",
            "/v1/generate",
            r#"{"seed": 3, "steps": 16, "sampler": "maskgit", "temperature": 1.2, "temperature_end": 0.6}"#.into(),
        ),
        (
            "even",
            "/v1/generate",
            r#"{"seed": 3, "steps": 8, "sampler": "even"}"#.into(),
        ),
        (
            "halton",
            "/v1/generate",
            r#"{"seed": 3, "count": 2, "steps": 6, "sampler": "halton"}"#.into(),
        ),
        (
            "threshold",
            "/v1/generate",
            r#"{"seed": 3, "count": 2, "steps": 16, "sampler": "threshold", "threshold": 0.8}"#.into(),
        ),
        (
            "maskgit-threshold",
            "/v1/generate",
            r#"{"seed": 3, "count": 2, "steps": 8, "sampler": "maskgit-threshold", "threshold": 0.8}"#.into(),
        ),
        (
            "cache",
            "/v1/generate",
            r#"{"seed": 3, "count": 2, "steps": 16, "sampler": "absorbing", "cache": 4}"#.into(),
        ),
        (
            "guidance",
            "/v1/generate",
            r#"{"seed": 3, "count": 2, "steps": 8, "class": 4, "guidance": 2}"#.into(),
        ),
        (
            "inpaint",
            "/v1/inpaint",
            format!(r#"{{"image": "{digit}", "rect": [8, 8, 16, 16], "seed": 5}}"#),
        ),
        (
            "inpaint-all",
            "/v1/inpaint",
            format!(r#"{{"image": "{digit}", "rect": [0, 0, 16, 32], "seed": 5, "decode_all": true}}"#),
        ),
        (
            "outpaint",
            "/v1/outpaint",
            format!(r#"{{"image": "{digit}", "extend": {{"right": 16, "down": 8}}, "seed": 2}}"#),
        ),
        (
            "vary",
            "/v1/vary",
            format!(r#"{{"image": "{digit}", "strength": 0.4, "seed": 5, "count": 2, "steps": 8}}"#),
        ),
        ("wide", "/v1/generate", r#"{"seed": 11, "grid": [8, 16]}"#.into()),
        (
            "preview",
            "/v1/generate",
            r#"{"seed": 4, "count": 2, "steps": 8, "frames": "gif"}"#.into(),
        ),
    ];
    let mut got = std::collections::BTreeMap::new();
    for (name, route, body) in &cases {
        let r = s.post(route, body);
        assert_eq!(r.status, 200, "{name}: {}", String::from_utf8_lossy(&r.body));
        if r.header("content-type") == Some("image/png") {
            got.insert(name.to_string(), common::sha256(&r.body));
            continue;
        }
        let j = r.json();
        for (i, img) in j["images"].as_array().unwrap().iter().enumerate() {
            let png = B64.decode(img.as_str().unwrap()).unwrap();
            got.insert(format!("{name}/{i}"), common::sha256(&png));
        }
        if let Some(frames) = j["frames"].as_str() {
            got.insert(format!("{name}/frames"), common::sha256(&B64.decode(frames).unwrap()));
        }
    }
    // single PNGs, the grid's 4, halton's, threshold's, maskgit-threshold's, the cache's,
    // guidance's and vary's 2 each, the preview's 2 + frames
    assert_eq!(got.len(), 7 + 4 + 2 + 2 + 2 + 2 + 2 + 2 + 3, "{got:?}");
    common::check_golden("server", &got);
}

/// `/metrics` read by a real Prometheus text parser: every family typed and documented, the
/// request counter labelled by route and status, the latency histogram with its buckets.
#[test]
fn metrics_parse_as_prometheus_text_with_types_help_and_labels() {
    use prometheus_parse::{Scrape, Value};
    let s = Server::start(&[], &[]);
    assert_eq!(s.post("/v1/generate", r#"{"seed": 1}"#).status, 200);
    assert_eq!(s.post("/v1/generate", r#"{"count": 0}"#).status, 400);
    let r = s.get("/metrics");
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body).unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let find = |name: &str, route: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|x| x.metric == name && route.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name} {route:?} in\n{text}"))
    };
    let ok = scrape
        .samples
        .iter()
        .find(|x| {
            x.metric == "absorb_requests_total"
                && x.labels.get("route") == Some("/v1/generate")
                && x.labels.get("status") == Some("200")
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(matches!(ok.value, Value::Counter(n) if n == 1.0), "{:?}", ok.value);
    let bad = find("absorb_requests_total", Some(("status", "400")));
    assert!(matches!(bad.value, Value::Counter(n) if n == 1.0), "{:?}", bad.value);
    let latency = find("absorb_request_duration_seconds", Some(("route", "/v1/generate")));
    let Value::Histogram(buckets) = &latency.value else {
        panic!("{:?}", latency.value)
    };
    assert_eq!(buckets.len(), 15, "14 bounds and +Inf");
    assert_eq!(buckets.last().unwrap().count, 2.0);
    assert!(matches!(find("absorb_queue_capacity", None).value, Value::Gauge(n) if n == 8.0));
    assert!(matches!(find("absorb_images_total", None).value, Value::Counter(n) if n == 1.0));
    for family in [
        "absorb_requests_total",
        "absorb_request_duration_seconds",
        "absorb_queue_depth",
        "absorb_requests_in_flight",
        "absorb_jobs_skipped_total",
        "absorb_transformer_calls_total",
        "absorb_steps_per_second",
    ] {
        assert!(scrape.docs.contains_key(family), "no HELP for {family}:\n{text}");
    }
}

/// A 16-bit gray PNG of `side` x `side` zeros: small to send, `side`^2 x 2 bytes decoded.
fn png16_bomb(side: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side, side);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Sixteen);
        enc.set_compression(png::Compression::High);
        let mut header = enc.write_header().unwrap();
        let mut w = header.stream_writer().unwrap();
        let row = vec![0u8; side as usize * 2];
        for _ in 0..side {
            w.write_all(&row).unwrap();
        }
        w.finish().unwrap();
    }
    out
}

#[test]
fn hostile_numbers_are_answered_4xx_naming_the_field_and_the_service_stays_healthy() {
    let s = Server::start(&[], &[]);
    let (side, _) = shape(&s);
    let image = B64.encode(png(side, side, |x, y| ((x * y) % 256) as u8));
    let u64max = "18446744073709551615";
    let cases: Vec<(&str, String, &str)> = vec![
        // The worker-killing sum of the issue: up + down wraps past usize::MAX.
        (
            "/v1/outpaint",
            format!(r#"{{"image": "{image}", "extend": {{"up": 18446744073709551612, "down": 4}}}}"#),
            "extend",
        ),
        (
            "/v1/outpaint",
            format!(r#"{{"image": "{image}", "extend": {{"right": {u64max}}}}}"#),
            "extend",
        ),
        (
            "/v1/outpaint",
            format!(r#"{{"image": "{image}", "extend": {{"left": 4294967296}}}}"#),
            "extend",
        ),
        (
            "/v1/outpaint",
            format!(r#"{{"image": "{image}", "extend": {{"right": 1e400}}}}"#),
            "extend.right",
        ),
        (
            "/v1/outpaint",
            format!(r#"{{"image": "{image}", "extend": {{"right": 4}}, "stride": [{u64max}, 1]}}"#),
            "stride",
        ),
        (
            "/v1/outpaint",
            format!(r#"{{"image": "{image}", "extend": {{"right": 4}}, "window_margin": [9223372036854775808, 0]}}"#),
            "window_margin",
        ),
        (
            "/v1/inpaint",
            format!(r#"{{"image": "{image}", "rect": [{u64max}, 0, 4, 4]}}"#),
            "rect",
        ),
        (
            "/v1/inpaint",
            format!(r#"{{"image": "{image}", "rect": [0, {u64max}, 4, 4]}}"#),
            "rect",
        ),
        (
            "/v1/inpaint",
            format!(r#"{{"image": "{image}", "rect": [0, 0, {u64max}, {u64max}]}}"#),
            "rect",
        ),
        (
            "/v1/inpaint",
            format!(r#"{{"image": "{image}", "rect": [4294967295, 0, 1, 1]}}"#),
            "rect",
        ),
        (
            "/v1/inpaint",
            format!(r#"{{"image": "{image}", "rect": [0, 0, 4, 4], "steps": {u64max}}}"#),
            "steps",
        ),
        ("/v1/generate", r#"{"count": 0}"#.into(), "count"),
        ("/v1/generate", r#"{"count": 17}"#.into(), "count"),
        ("/v1/generate", r#"{"count": 4294967295}"#.into(), "count"),
        ("/v1/generate", format!(r#"{{"count": {u64max}}}"#), "count"),
        ("/v1/generate", r#"{"count": 18446744073709551616}"#.into(), "count"),
        ("/v1/generate", r#"{"steps": 0}"#.into(), "steps"),
        ("/v1/generate", r#"{"steps": 65}"#.into(), "steps"),
        ("/v1/generate", format!(r#"{{"steps": {u64max}}}"#), "steps"),
        ("/v1/generate", r#"{"steps": 1e400}"#.into(), "steps"),
        ("/v1/generate", r#"{"steps": -1}"#.into(), "steps"),
        ("/v1/generate", r#"{"seed": -1}"#.into(), "seed"),
        ("/v1/generate", r#"{"seed": 1e400}"#.into(), "seed"),
        ("/v1/generate", r#"{"temperature": 1e39}"#.into(), "temperature"),
        ("/v1/generate", format!(r#"{{"grid": [{u64max}, 8]}}"#), "grid"),
        ("/v1/generate", r#"{"grid": [33, 8]}"#.into(), "grid"),
        (
            "/v1/generate",
            r#"{"grid": [8, 16], "stride": [0, 0]}"#.into(),
            "stride",
        ),
        (
            "/v1/generate",
            format!(r#"{{"grid": [8, 16], "window_margin": [{u64max}, 0]}}"#),
            "window_margin",
        ),
        ("/v1/generate", r#"{"grid": [32, 32], "steps": 257}"#.into(), "steps"),
    ];
    for (route, body, field) in &cases {
        let r = s.post(route, body);
        let shown = &body[..body.len().min(160)];
        assert_eq!(r.status, 400, "{route} {shown}: {}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert_eq!(j["field"], *field, "{route} {shown}: {j}");
        assert_eq!(s.get("/healthz").status, 200, "after {route} {shown}");
    }
    // The edges that are legal still work.
    for (route, body) in [
        (
            "/v1/generate",
            format!(r#"{{"seed": {u64max}, "steps": 1, "count": 16}}"#),
        ),
        (
            "/v1/inpaint",
            format!(
                r#"{{"image": "{image}", "rect": [{}, {}, 1, 1], "steps": 1}}"#,
                side - 1,
                side - 1
            ),
        ),
    ] {
        assert_eq!(s.post(route, &body).status, 200, "{route} {body:.80}");
    }
    assert_eq!(s.metric("absorb_panics_total"), 0.0);
}

#[test]
fn a_panic_while_serving_is_answered_500_and_the_service_goes_on() {
    let s = Server::start(&[], &[("ABSORB_TEST_PANIC", "worker:7,handler:8")]);
    for seed in [7, 8] {
        let r = s.post("/v1/generate", &format!(r#"{{"seed": {seed}}}"#));
        assert_eq!(r.status, 500, "seed {seed}: {}", String::from_utf8_lossy(&r.body));
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.contains("panicked") && e.contains("goes on"), "{e}");
        let id = r.header("x-request-id").expect("a request id").to_string();
        // The line is logged as the answer goes out: give it a moment to reach the pipe.
        let line = format!("request {id} (/v1/generate) answered 500");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.log().contains(&line) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(s.log().contains(&line), "the log names request {id}:\n{}", s.log());
        assert_eq!(s.get("/healthz").status, 200, "after the panic of seed {seed}");
        let ok = s.post("/v1/generate", r#"{"seed": 1}"#);
        assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
        assert_eq!(ok.header("content-type"), Some("image/png"));
    }
    assert_eq!(
        s.metric("absorb_panics_total"),
        2.0,
        "the worker's and the handler's panics are counted"
    );
    assert!(s.log().contains("injected by ABSORB_TEST_PANIC (worker:7)"));
}

#[test]
fn decompression_bombs_are_refused_from_their_header_while_healthz_stays_fast() {
    let s = Server::start(&[], &[]);
    let bomb = B64.encode(png16_bomb(8192));
    assert!(
        bomb.len() < 1 << 20,
        "fits the default body limit: {} bytes",
        bomb.len()
    );
    let before = s.rss_kib();
    let body = format!(r#"{{"image": "{bomb}", "extend": {{"right": 4}}}}"#);
    let inpaint = format!(r#"{{"image": "{bomb}", "rect": [0, 0, 4, 4]}}"#);
    let (addr, a, b) = (s.addr.clone(), body.clone(), inpaint.clone());
    let bombs: Vec<_> = [("/v1/outpaint", a), ("/v1/inpaint", b)]
        .into_iter()
        .map(|(route, body)| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                (0..20)
                    .map(|_| http(&addr, "POST", route, body.as_bytes()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(s.get("/healthz").status, 200);
        worst = worst.max(t.elapsed());
    }
    for r in bombs.into_iter().flat_map(|t| t.join().unwrap()) {
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert_eq!(j["field"], "image");
        assert!(j["error"].as_str().unwrap().contains("8192x8192"), "{j}");
    }
    let (peak, grew) = (s.peak_rss_kib(), s.rss_kib().saturating_sub(before));
    eprintln!(
        "bombs: RSS {before} -> {} KiB, peak {peak} KiB; slowest /healthz meanwhile {worst:?}",
        s.rss_kib()
    );
    // Decoded, each bomb is 128 MiB of 16-bit samples (and 64 MiB more as 8-bit).
    assert!(
        peak < 150 * 1024,
        "two bombs at a time peaked the service at {peak} KiB"
    );
    assert!(grew < 50 * 1024, "40 bombs grew RSS by {grew} KiB");
}

#[test]
fn a_one_batch_job_whose_client_hangs_up_stops_between_transformer_calls() {
    let s = Server::start(&["--max-batch", "16"], &[]);
    // One image on the largest grid at many steps: one batch, hundreds of transformer calls.
    let heavy = r#"{"seed": 1, "grid": [32, 32], "steps": 256}"#;
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let head = format!(
        "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{heavy}",
        heavy.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    while s.metric("absorb_transformer_calls_total") < 1.0 && s.metric("absorb_requests_in_flight") < 1.0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(200));
    c.shutdown(Shutdown::Both).unwrap();
    let start = Instant::now();
    while s.metric("absorb_jobs_skipped_total") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(60), "the hung-up job ran on");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.metric("absorb_images_total"), 0.0, "the hung-up job made no image");
    let r = s.post("/v1/generate", r#"{"seed": 2, "steps": 4}"#);
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------------------------
// Slow clients, the connection cap and the drain deadline (src/server/connections.rs)

/// `n` generate requests (seeds 0..n, the other fields `fields`), each on its own thread, once
/// the service counts all of them in flight.
fn in_flight(s: &Server, n: usize, fields: &str) -> Vec<std::thread::JoinHandle<Reply>> {
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let addr = s.addr.clone();
            let body = format!(r#"{{"seed": {i}, {fields}}}"#);
            std::thread::spawn(move || http(&addr, "POST", "/v1/generate", body.as_bytes()))
        })
        .collect();
    let start = Instant::now();
    while s.metric("absorb_requests_in_flight") < n as f64 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "requests never all in flight"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    clients
}

/// A connection that has sent `sent` and nothing more.
fn half_sent(addr: &str, sent: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(sent).unwrap();
    c
}

/// True once the server has closed `c` (EOF or reset on a read), waiting up to `within`.
fn closed_by_server(c: &mut TcpStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an answer (e.g. 408) before the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Clients that send a request head one byte every `every`, on their own thread, until the
/// server closes them; `closed()` counts those it has closed.
struct Trickle {
    closed: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Trickle {
    fn start(addr: &str, n: usize, every: Duration) -> Trickle {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let mut conns: Vec<Option<TcpStream>> = (0..n)
            .map(|_| {
                let c = TcpStream::connect(addr).expect("connect a slow client");
                c.set_nonblocking(true).unwrap();
                Some(c)
            })
            .collect();
        let (closed, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, halt) = (closed.clone(), stop.clone());
        let head = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let thread = std::thread::spawn(move || {
            let mut at = 0;
            while !halt.load(Ordering::Relaxed) && conns.iter().any(Option::is_some) {
                for slot in conns.iter_mut() {
                    let Some(c) = slot else { continue };
                    let mut buf = [0u8; 64];
                    let gone = match c.read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    };
                    // Never the final blank line: the head stays incomplete.
                    if gone || c.write(&head[at % (head.len() - 2)..][..1]).is_err() {
                        *slot = None;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                at += 1;
                std::thread::sleep(every);
            }
        });
        Trickle {
            closed,
            stop,
            thread: Some(thread),
        }
    }

    fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn two_hundred_slow_clients_are_closed_at_the_header_timeout_and_others_are_answered_meanwhile() {
    let s = Server::start(&["--header-timeout-ms", "3000"], &[]);
    let before = Instant::now();
    assert_eq!(s.get("/healthz").status, 200);
    let usual = before.elapsed();
    let slow = Trickle::start(&s.addr, 200, Duration::from_secs(1));
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        s.metric("absorb_connections_open") >= 200.0,
        "the slow clients are connected"
    );
    // While they are held, a normal client is answered at once (not after the timeout).
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(s.get("/healthz").status, 200);
        let took = t.elapsed();
        assert!(
            took < usual + Duration::from_millis(1000),
            "healthz took {took:?} among slow clients (usually {usual:?})"
        );
    }
    assert_eq!(s.post("/v1/generate", r#"{"seed": 3}"#).status, 200);
    assert_eq!(slow.closed(), 0, "slow clients closed before their header timeout");
    // Then the server closes every one of them, a little after 3 s.
    while slow.closed() < 200 {
        assert!(
            opened.elapsed() < Duration::from_secs(15),
            "only {} of 200 slow clients closed after {:?}",
            slow.closed(),
            opened.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(opened.elapsed() >= Duration::from_millis(2500));
    assert!(s.metric("absorb_header_timeouts_total") >= 200.0);
    // The gauge drops when a connection's task ends, just after the client has seen it closed.
    let closed = Instant::now();
    while s.metric("absorb_connections_open") > 1.0 {
        assert!(
            closed.elapsed() < Duration::from_secs(5),
            "{} connections still counted open 5 s after the 200 were closed",
            s.metric("absorb_connections_open")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn a_body_slower_than_the_body_timeout_is_answered_408_and_the_connection_closed() {
    let s = Server::start(&["--body-timeout-ms", "1000"], &[]);
    let body = r#"{"seed": 1}"#;
    let mut c = half_sent(
        &s.addr,
        format!(
            "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            &body[..4]
        )
        .as_bytes(),
    );
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let r = parse_reply(&raw);
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    assert!(t.elapsed() >= Duration::from_millis(900), "408 before the timeout");
    assert_eq!(r.json()["field"], "body");
    assert!(
        r.json()["error"].as_str().unwrap().contains("1000 ms"),
        "{:?}",
        r.json()
    );
    assert_eq!(s.metric("absorb_body_timeouts_total"), 1.0);
    assert_eq!(s.post("/v1/generate", body).status, 200);
}

#[test]
fn connections_over_the_cap_are_answered_503_at_once() {
    let s = Server::start(&["--max-connections", "4"], &[]);
    let idle: Vec<_> = (0..4).map(|_| half_sent(&s.addr, b"")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let r = s.get("/healthz");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"].as_str().unwrap().contains("--max-connections"));
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(idle);
    let start = Instant::now();
    while s.get("/healthz").status != 200 {
        assert!(start.elapsed() < Duration::from_secs(5), "the cap never freed up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.metric("absorb_connections_refused_total") >= 1.0);
}

#[test]
fn sigterm_with_a_half_sent_request_exits_at_once_with_status_0() {
    // A long drain deadline: the exit must not wait for it.
    let mut s = Server::start(&["--drain-timeout-ms", "60000"], &[]);
    let mut c = half_sent(&s.addr, b"GET /healthz HTTP/1.1\r\n");
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0), "{}", s.log());
    let took = t.elapsed();
    assert!(closed_by_server(&mut c, Duration::from_secs(1)));
    eprintln!("exit after SIGTERM with a half-sent request: {took:?}");
    assert!(s.log().contains("drained in"), "{}", s.log());
}

#[test]
fn sigterm_with_50_slow_clients_answers_the_3_accepted_requests_then_exits_0() {
    let mut s = Server::start(&["--max-batch", "1", "--drain-timeout-ms", "60000"], &[]);
    let (_, tokens) = shape(&s);
    let slow = Trickle::start(&s.addr, 50, Duration::from_millis(200));
    let clients = in_flight(&s, 3, &format!(r#""count": 4, "steps": {tokens}"#));
    s.sigterm();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["images"].as_array().unwrap().len(), 4, "request {i}");
    }
    let answered = Instant::now();
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0), "{}", s.log());
    eprintln!("exit {:?} after the last accepted answer", answered.elapsed());
    let start = Instant::now();
    while slow.closed() < 50 {
        assert!(start.elapsed() < Duration::from_secs(5), "slow clients left open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn at_the_drain_deadline_waiting_requests_are_answered_503_and_the_process_exits_0() {
    let mut s = Server::start(&["--max-batch", "1", "--drain-timeout-ms", "1000"], &[]);
    let (_, tokens) = shape(&s);
    // Far more work than a second, even on a fast CPU: 16 images of 2x2 windows each (an AVX-512
    // Xeon makes 16 single-window images in 0.8 s). The first runs, the second waits behind it.
    let _half = half_sent(&s.addr, b"POST /v1/generate HTTP/1.1\r\nContent-Le");
    let m = s.get("/v1/model").json();
    let grid = &m["bundle"]["manifest"]["tokens"];
    let (h, w) = (grid["height"].as_u64().unwrap(), grid["width"].as_u64().unwrap());
    let fields = format!(r#""count": 16, "steps": {tokens}, "grid": [{}, {}]"#, 2 * h, 2 * w);
    let clients = in_flight(&s, 2, &fields);
    let t = Instant::now();
    s.sigterm();
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.join().unwrap();
        assert_eq!(r.status, 503, "request {i}: {}", String::from_utf8_lossy(&r.body));
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains("1000 ms drain deadline"), "{error}");
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.log());
    let took = t.elapsed();
    eprintln!("exit {took:?} after SIGTERM at a 1000 ms deadline with 2 long requests");
    assert!(
        took >= Duration::from_millis(900),
        "exited before the deadline: {took:?}"
    );
    assert!(s.log().contains("deadline passed"), "{}", s.log());
}

// ---------------------------------------------------------------------------------------------
// Asynchronous jobs (src/server/jobs.rs)

fn job_status(s: &Server, id: u64) -> serde_json::Value {
    s.get(&format!("/v1/jobs/{id}")).json()
}

#[test]
fn an_async_job_streams_its_progress_and_answers_the_synchronous_bytes() {
    let s = Server::start(&["--max-jobs", "2"], &[]);
    let body = r#"{"seed": 9, "steps": 6, "temperature": 0.9}"#;
    let sync = s.post("/v1/generate", body);
    assert_eq!(sync.status, 200);
    let r = s.post("/v1/jobs", body);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_u64().unwrap();
    assert_eq!(r.header("location"), Some(format!("/v1/jobs/{id}").as_str()));
    // The stream: status events (queued, running, one per call), then one `done`, then it ends.
    let events = s.get(&format!("/v1/jobs/{id}/events"));
    assert_eq!(events.status, 200);
    assert_eq!(events.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(events.body).unwrap();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.last(), Some(&"done"), "{text}");
    assert_eq!(names.iter().filter(|&&n| n == "done").count(), 1);
    let data: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = data.last().unwrap();
    assert_eq!(last["state"], "done");
    assert!(last["step"].as_u64().unwrap() >= 1 && last["masked"] == 0, "{last}");
    assert!(
        B64.decode(last["pngs"][0].as_str().unwrap()).unwrap() == sync.body,
        "event PNG != sync PNG"
    );
    let st = job_status(&s, id);
    assert_eq!((st["state"].as_str(), st["seed"].as_u64()), (Some("done"), Some(9)));
    let png = s.get(st["images"][0].as_str().unwrap());
    assert_eq!(png.header("content-type"), Some("image/png"));
    assert!(
        png.body == sync.body,
        "GET /v1/jobs/{{id}}/images/0 != the synchronous PNG"
    );
    // An inpaint job takes the synchronous body too; a bad one is refused at once, naming the field.
    let bad = s.post("/v1/jobs?type=inpaint", r#"{"image": "x", "rect": [0, 0, 1, 1]}"#);
    assert_eq!((bad.status, bad.json()["field"].as_str()), (400, Some("image")));
    assert_eq!(s.post("/v1/jobs?type=paint", "{}").json()["field"], "type");
    // The store holds 2: a third job evicts the oldest finished one, whose id then answers 410.
    let second = s.post("/v1/jobs", r#"{"seed": 1, "steps": 2}"#).json()["id"]
        .as_u64()
        .unwrap();
    while job_status(&s, second)["state"] != "done" {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.post("/v1/jobs", r#"{"seed": 2, "steps": 2}"#).status, 202);
    assert_eq!(s.get(&format!("/v1/jobs/{id}")).status, 410);
    assert_eq!(s.get("/v1/jobs/999999").status, 404);
    assert_eq!(s.metric("absorb_jobs_expired_total"), 1.0);
    assert_eq!(s.metric("absorb_jobs_submitted_total"), 3.0);
}

#[test]
fn cancelling_a_running_job_stops_it_within_one_transformer_call() {
    let s = Server::start(&["--max-batch", "16"], &[]);
    // One image on the largest grid at many steps: hundreds of transformer calls.
    let r = s.post("/v1/jobs", r#"{"seed": 1, "grid": [32, 32], "steps": 256}"#);
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_u64().unwrap();
    while job_status(&s, id)["step"].as_u64().unwrap() < 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let d = http(&s.addr, "DELETE", &format!("/v1/jobs/{id}"), b"");
    assert_eq!(d.status, 200);
    let at_delete = d.json()["step"].as_u64().unwrap();
    let start = Instant::now();
    while job_status(&s, id)["state"] != "cancelled" {
        assert!(start.elapsed() < Duration::from_secs(10), "not cancelled");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The worker is free: a new request is answered, and the cancelled job made no more calls
    // than the one under way when DELETE came.
    assert_eq!(s.post("/v1/generate", r#"{"seed": 2, "steps": 4}"#).status, 200);
    let last = job_status(&s, id)["step"].as_u64().unwrap();
    assert!(last <= at_delete + 1, "{} calls after DELETE", last - at_delete);
    assert_eq!(s.metric("absorb_jobs_cancelled_total"), 1.0);
    assert_eq!(
        s.metric("absorb_images_total"),
        1.0,
        "only the later request made an image"
    );
}

#[test]
fn the_page_is_served_at_the_root() {
    let s = Server::start(&[], &[]);
    let r = s.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = String::from_utf8(r.body).unwrap();
    assert!(html.contains("<title>absorb</title>") && html.contains("/v1/jobs"));
    assert!(html.len() < 200 * 1024, "the page is {} bytes", html.len());
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads nothing from a network"
    );
}

#[test]
fn a_followed_job_streams_live_previews_with_the_masked_tokens_grey_and_an_unfollowed_one_none() {
    let s = Server::start(&[], &[]);
    let body = r#"{"seed": 4, "count": 16, "steps": 64}"#;
    let id = s.post("/v1/jobs", body).json()["id"].as_u64().unwrap();
    let text = String::from_utf8(s.get(&format!("/v1/jobs/{id}/events")).body).unwrap();
    let data: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let previews: Vec<&serde_json::Value> = data.iter().filter(|d| d.get("preview").is_some()).collect();
    assert!(
        previews.len() >= 2,
        "{} previews in {} events",
        previews.len(),
        data.len()
    );
    let done = data.last().unwrap();
    assert_eq!(done["state"], "done");
    assert_eq!(
        done["previews"].as_u64(),
        Some(previews.len() as u64),
        "each preview sent once"
    );
    assert_eq!(s.metric("absorb_previews_total"), previews.len() as f64);
    let last = B64.decode(done["pngs"][0].as_str().unwrap()).unwrap();
    let size = image::load_from_memory(&last).unwrap().to_luma8().dimensions();
    let (mut grey_before, mut grey_first) = (u32::MAX, None);
    for p in &previews {
        let pv = &p["preview"];
        assert_eq!(
            (pv["first"].as_u64(), pv["pngs"].as_array().unwrap().len()),
            (Some(0), 16)
        );
        // The masked share never grows from preview to preview; grey pixels follow it. (The
        // paper's sampler may reveal none of image 0's tokens between two previews: previews
        // are paced by time, so which steps they show depends on the machine.)
        let img = image::load_from_memory(&B64.decode(pv["pngs"][0].as_str().unwrap()).unwrap())
            .unwrap()
            .to_luma8();
        assert_eq!(img.dimensions(), size);
        let grey = img.pixels().filter(|px| px.0[0] == 128).count() as u32;
        assert!(
            grey <= grey_before,
            "step {}: {grey} grey pixels, {grey_before} before",
            pv["step"]
        );
        grey_first.get_or_insert(grey);
        grey_before = grey;
        assert!(p["masked"].as_u64().unwrap() > 0, "a preview of a finished image");
    }
    assert!(
        grey_first > Some(grey_before),
        "grey pixels never shrank: {grey_before}"
    );
    assert!(
        previews[0]["masked"].as_u64() > previews.last().unwrap()["masked"].as_u64(),
        "{:?}",
        previews.iter().map(|p| &p["masked"]).collect::<Vec<_>>()
    );
    // Nobody follows this one: no preview is decoded.
    let id = s.post("/v1/jobs", body).json()["id"].as_u64().unwrap();
    while job_status(&s, id)["state"] != "done" {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(job_status(&s, id)["previews"], 0);
}

/// A copy of the bundle in `src` at `dst`, its model.json's name set to `name` (and, with
/// `graph`, its transformer replaced by those bytes, the manifest's sha256 updated to match, so
/// the bundle reads but its graph cannot load).
fn bundle_named(src: &Path, dst: &Path, name: &str, graph: Option<&[u8]>) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    let path = dst.join("model.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    if j["name"] == name && graph.is_none() {
        // Untouched: the same bundle (sha256 and all) in another directory.
        return;
    }
    j["name"] = name.into();
    if let Some(bytes) = graph {
        let file = j["graphs"]["transformer"]["file"].as_str().unwrap().to_string();
        std::fs::write(dst.join(&file), bytes).unwrap();
        j["graphs"]["transformer"]["sha256"] = common::sha256(bytes).into();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
}

/// The process's resident memory in MiB (Linux).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

#[test]
fn several_bundles_load_on_demand_within_max_loaded_and_a_broken_one_fails_only_its_own_requests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let dir = tempfile::tempdir().unwrap();
    let many = dir.path().join("many");
    bundle_named(&root.join("scenes"), &many.join("a-scenes"), "scenes", None);
    bundle_named(
        &root.join("digits"),
        &many.join("b-noload"),
        "noload",
        Some(b"not an onnx graph"),
    );
    std::fs::create_dir_all(many.join("c-unreadable")).unwrap();
    std::fs::write(many.join("c-unreadable/model.json"), b"{\"name\": ").unwrap();
    let m = many.to_string_lossy().into_owned();
    // -m digits (Server::start) first: the default and the one warmed up.
    let s = Server::start(&["--models", &m, "--max-loaded", "1"], &[]);
    let names: Vec<String> = s.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["digits", "scenes", "noload", "c-unreadable"]);
    assert_eq!(s.metric("absorb_models_loaded"), 1.0);

    // Alternating requests under --max-loaded 1: each succeeds with the CLI's bytes, one bundle
    // is loaded at a time, and the memory stays bounded.
    let d = tempfile::tempdir().unwrap();
    cli(
        d.path(),
        &["generate", "-m", &model_arg(), "--seed", "3", "-o", "d.png"],
    );
    let scenes = root.join("scenes").to_string_lossy().into_owned();
    cli(d.path(), &["generate", "-m", &scenes, "--seed", "3", "-o", "s.png"]);
    let (want_d, want_s) = (
        std::fs::read(d.path().join("d.png")).unwrap(),
        std::fs::read(d.path().join("s.png")).unwrap(),
    );
    let mut rss = Vec::new();
    for round in 0..4 {
        let a = s.post("/v1/generate", r#"{"seed": 3, "model": "scenes"}"#);
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let b = s.post("/v1/generate", r#"{"seed": 3}"#);
        assert_eq!(b.status, 200, "{}", String::from_utf8_lossy(&b.body));
        // The PNG's metadata names the bundle it was made with: scenes' bytes are the CLI's
        // from the scenes directory (the copy has the same model.json).
        assert!(a.body == want_s, "round {round}: scenes != the CLI's");
        assert!(b.body == want_d, "round {round}: digits != the CLI's");
        assert_eq!(s.metric("absorb_models_loaded"), 1.0);
        rss.push(rss_mib(s.pid()));
    }
    eprintln!("RSS after each round of two bundles under --max-loaded 1: {rss:.0?} MiB");
    assert!(
        rss[3] < rss[1] * 1.25 + 32.0,
        "RSS grows with every load: {rss:.0?} MiB"
    );
    assert!(s.metric("absorb_model_loads_total") >= 8.0);
    assert!(s.metric("absorb_model_unloads_total") >= 7.0);

    // The broken bundles answer their own requests with their error; the others go on.
    for (name, needle) in [
        ("noload", "model \"noload\" cannot be used"),
        ("c-unreadable", "model.json"),
    ] {
        let r = s.post("/v1/generate", &format!(r#"{{"seed": 1, "model": "{name}"}}"#));
        assert_eq!(r.status, 500, "{name}: {}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert!(j["error"].as_str().unwrap().contains(needle), "{name}: {j}");
        assert_eq!(j["field"], "model", "{j}");
        assert_eq!(s.post("/v1/generate", r#"{"seed": 3}"#).body, want_d, "after {name}");
    }
    // A bundle that failed to load fails at once from then on (until a reload): no new load,
    // nothing unloaded for it.
    let (loads, unloads) = (
        s.metric("absorb_model_loads_total"),
        s.metric("absorb_model_unloads_total"),
    );
    let r = s.post("/v1/generate", r#"{"seed": 1, "model": "noload"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(s.metric("absorb_model_load_failures_total"), 1.0);
    assert_eq!(s.metric("absorb_model_loads_total"), loads);
    assert_eq!(s.metric("absorb_model_unloads_total"), unloads);
    let r = s.post("/v1/generate", r#"{"model": "nope"}"#);
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("digits, scenes, noload, c-unreadable"));
    let r = s.post("/v1/generate", r#"{"model": 7}"#);
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("model")));
    // /v1/model?name= describes one bundle.
    let info = s.get("/v1/model?name=scenes").json();
    assert_eq!(info["bundle"]["manifest"]["name"], "scenes");
    assert_eq!(info["models"].as_array().unwrap().len(), 4);

    // Reload: a new bundle appears without a restart (route and SIGHUP).
    bundle_named(&root.join("digits"), &many.join("d-twin"), "twin", None);
    let r = s.post("/v1/models/reload", "");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["models"].as_array().unwrap().len(), 5);
    let t = s.post("/v1/generate", r#"{"seed": 3, "model": "twin"}"#);
    assert_eq!(t.status, 200, "{}", String::from_utf8_lossy(&t.body));
    std::fs::remove_dir_all(many.join("d-twin")).unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    while s.get("/v1/models").json()["data"].as_array().unwrap().len() != 4 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "SIGHUP did not reload: {}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.post("/v1/generate", r#"{"model": "twin"}"#).status, 404);
    assert_eq!(s.get("/healthz").status, 200);
}
