//! `cargo bench -p trellis-tests --bench dataplane` (root): request latency through two
//! Trellis-configured Envoys (caller's egress, callee's ingress, transparent redirect) against the
//! same request sent directly, measured side by side in one run and reported as ratios.
//!
//! Both paths cross the same kind of VPC bridge between two task namespaces and reach the same
//! minimal HTTP/1.1 server; only the meshed pair has the route manager's rules and Envoys. The
//! bench re-executes itself inside the namespaces (`--serve PORT`, `--client IP PORT N`), so no
//! process here ever switches namespace itself. Rounds alternate direct and meshed so drift on a
//! noisy machine hits both alike.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use trellis_tests::mesh::{Agent, Task, Vpc};
use trellis_tests::scenario::{TaskSpec, back_front_items, back_spec, resources_file, start_tasks};
use trellis_tests::{Proc, Workdir, check, eventually};

const PORT: u16 = 8080;
const HOST: &str = "back.local:8080";
const REQUESTS: usize = 4000;
const WARMUP: usize = 300;
const ROUNDS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--serve") => serve(args.get(2).and_then(|p| p.parse().ok()).unwrap_or(PORT)),
        Some("--client") => client(&args[2..]),
        _ => orchestrate(),
    }
}

/// A keep-alive HTTP/1.1 server answering every request with a 2-byte body, a thread per
/// connection: fast enough that the path, not the server, dominates.
fn serve(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut w = match conn.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut r = BufReader::new(conn);
            let mut line = String::new();
            loop {
                // Request line and headers up to the blank line; GETs carry no body.
                let mut saw_any = false;
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == "\r\n" && saw_any {
                        break;
                    }
                    saw_any = true;
                }
                if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Sends `n` sequential GETs on one keep-alive connection and prints each latency in ns.
fn client(args: &[String]) {
    let (ip, port, n) = match args {
        [ip, port, n] => (ip, port, n.parse::<usize>().expect("count")),
        _ => panic!("--client IP PORT N"),
    };
    let conn = TcpStream::connect(format!("{ip}:{port}")).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    let req = format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    let mut out = String::new();
    let mut line = String::new();
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(req.as_bytes()).expect("send");
        let mut len = 0usize;
        let mut status = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).expect("read");
            if status.is_empty() {
                status = line.clone();
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).expect("body");
        assert!(status.contains(" 200 "), "unexpected answer: {status}");
        out.push_str(&format!("{}\n", t.elapsed().as_nanos()));
    }
    print!("{out}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn me() -> String {
    std::env::current_exe()
        .expect("own path")
        .display()
        .to_string()
}

fn start_server(work: &Workdir, task: &Task) -> Proc {
    let p = Proc::spawn(
        &format!("server in {}", task.ns),
        &mut task.cmd(&[&me(), "--serve", &PORT.to_string()]),
        work.join(&format!("server-{}.log", task.ns)),
    );
    let url = format!("http://127.0.0.1:{PORT}/");
    eventually("server listening", Duration::from_secs(10), || {
        task.http_get(None, &url).map(|_| ())
    });
    p
}

/// Latencies of one round, sorted, in µs.
fn round(from: &Task, to: &Task, n: usize) -> Vec<f64> {
    let out = check(&mut from.cmd(&[&me(), "--client", &to.ip, &PORT.to_string(), &n.to_string()]));
    let mut v: Vec<f64> = out
        .lines()
        .filter_map(|l| l.parse::<f64>().ok())
        .map(|ns| ns / 1000.0)
        .collect();
    assert_eq!(v.len(), n, "every request answered");
    v.sort_by(f64::total_cmp);
    v
}

fn pct(v: &[f64], p: f64) -> f64 {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn orchestrate() {
    if !is_root() {
        eprintln!("dataplane bench skipped: needs root for network namespaces and iptables");
        return;
    }
    let work = Workdir::new("dataplane");
    let mut back = back_spec();
    back["listeners"][0]["portMapping"]["port"] = json!(PORT);
    let resources = resources_file(&work, &back_front_items(back, true));
    let agent = Agent::start(&work, Some(&resources));
    let mut vpc = Vpc::new(&work, 17);
    let front = vpc.task("front", 2);
    let back = vpc.task("back", 3);
    let plain_front = vpc.task("pfront", 4);
    let plain_back = vpc.task("pback", 5);
    vpc.start_dns(&work, &[(&back.ip, "back.local back-vn.trellis.test")]);
    let specs = [
        TaskSpec {
            name: "back",
            node: "back-vn",
            app: None,
        },
        TaskSpec {
            name: "front",
            node: "front-vn",
            app: None,
        },
    ];
    let mut procs = start_tasks(
        &work,
        &agent,
        "m",
        &[(&back, &specs[0]), (&front, &specs[1])],
        &|_| {},
    );
    procs.push(start_server(&work, &back));
    procs.push(start_server(&work, &plain_back));
    eventually("meshed path answers", Duration::from_secs(20), || {
        front.http_get(None, "http://back.local:8080/").map(|_| ())
    });

    let (mut direct50, mut direct99, mut mesh50, mut mesh99) = (vec![], vec![], vec![], vec![]);
    let _ = round(&plain_front, &plain_back, WARMUP);
    let _ = round(&front, &back, WARMUP);
    for _ in 0..ROUNDS {
        let d = round(&plain_front, &plain_back, REQUESTS);
        let m = round(&front, &back, REQUESTS);
        direct50.push(pct(&d, 0.5));
        direct99.push(pct(&d, 0.99));
        mesh50.push(pct(&m, 0.5));
        mesh99.push(pct(&m, 0.99));
    }
    let (d50, d99, m50, m99) = (
        median(direct50),
        median(direct99),
        median(mesh50),
        median(mesh99),
    );
    println!(
        "dataplane: {ROUNDS} rounds x {REQUESTS} sequential keep-alive GETs, medians of the rounds"
    );
    println!("  direct                 p50 {d50:8.1} us   p99 {d99:8.1} us");
    println!("  through two Envoys     p50 {m50:8.1} us   p99 {m99:8.1} us");
    println!(
        "  ratio (mesh / direct)  p50 {:8.2}x     p99 {:8.2}x",
        m50 / d50,
        m99 / d99
    );
    drop(procs);
}
