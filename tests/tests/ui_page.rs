//! The topology page (`GET /ui`) rendered by real headless Chromium against an agent with
//! `--api-auth`, while `front` sends live traffic through its Envoy: the page signs its own
//! requests (credentials handed over in the URL fragment, never sent to the server), draws every
//! resource of the mesh, and marks the edges carrying traffic, as both its DOM and its
//! screenshot's pixels show. Without credentials the page shows the sign-in form and no mesh.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_tests::auth::{ApiAuth, AuthFile};
use trellis_tests::mesh::{Agent, AgentOpts, Vpc};
use trellis_tests::scenario::{TaskSpec, resources_file, start_tasks};
use trellis_tests::{Proc, Workdir, can_run_privileged, check, eventually, run};

const PORT: u16 = 9080;
/// The page's colours (index.html): a node's fill, a live link's stroke.
const NODE_FILL: (u8, u8, u8) = (0xdb, 0xea, 0xfe);
const LIVE: (u8, u8, u8) = (0x16, 0xa3, 0x4a);

fn node(name: &str) -> Value {
    json!({"meshName": "m", "virtualNodeName": name, "spec": {
        "listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}],
        "serviceDiscovery": {"dns": {"hostname": format!("{name}.trellis.test")}}}})
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Headless Chromium on `url`: `--dump-dom` (the DOM after the page's scripts ran) or a
/// screenshot to `shot`.
fn chromium_run(work: &Workdir, browser: &Path, url: &str, shot: Option<&Path>) -> String {
    let profile = work.join("chromium-profile");
    let mut c = Command::new(browser);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1400,900",
        // The page fetches its data and redraws every 2 s; give it a few rounds.
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match shot {
        Some(p) => c.arg(format!("--screenshot={}", p.display())),
        None => c.arg("--dump-dom"),
    };
    c.arg(url);
    check(&mut c)
}

/// Pixels of the PNG at `path` close to each of `colours` (Python's zlib decodes it).
fn count_colours(path: &Path, colours: &[(u8, u8, u8)]) -> Vec<usize> {
    let script = r#"
import struct, sys, zlib
data = open(sys.argv[1], 'rb').read()
assert data[:8] == b'\x89PNG\r\n\x1a\n'
pos, idat = 8, b''
while pos < len(data):
    n, kind = struct.unpack('>I4s', data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b'IHDR':
        w, h, depth, ctype, _, _, interlace = struct.unpack('>IIBBBBB', body)
    elif kind == b'IDAT':
        idat += body
    pos += 12 + n
assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
bpp = 4 if ctype == 6 else 3
raw = zlib.decompress(idat)
stride = w * bpp
prev = bytearray(stride)
want = [tuple(int(c) for c in a.split(',')) for a in sys.argv[2:]]
counts = [0] * len(want)
for y in range(h):
    f = raw[y * (stride + 1)]
    line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if f == 1: line[i] = (line[i] + a) & 255
        elif f == 2: line[i] = (line[i] + b) & 255
        elif f == 3: line[i] = (line[i] + ((a + b) >> 1)) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    for x in range(0, stride, bpp):
        px = (line[x], line[x + 1], line[x + 2])
        for k, (r, g, bl) in enumerate(want):
            if abs(px[0] - r) + abs(px[1] - g) + abs(px[2] - bl) <= 24:
                counts[k] += 1
    prev = line
print(' '.join(map(str, counts)))
"#;
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-c", script]).arg(path);
    for (r, g, b) in colours {
        c.arg(format!("{r},{g},{b}"));
    }
    check(&mut c)
        .split_whitespace()
        .map(|n| n.parse().expect("a count"))
        .collect()
}

#[test]
fn the_page_draws_the_mesh_and_its_live_traffic_in_headless_chromium() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "the topology page test needs chromium (scripts/setup.sh installs it in CI)"
        );
        eprintln!("SKIPPED the topology page: no chromium (apt-get install chromium)");
        return;
    };
    if !can_run_privileged("the topology page with live traffic") {
        return;
    }
    let work = Workdir::new("ui");
    let resources = resources_file(
        &work,
        &json!([
            {"meshName": "m"},
            node("blue"),
            node("red"),
            {"meshName": "m", "virtualNodeName": "front", "spec": {
                "backends": [{"virtualService": {"virtualServiceName": "color.local"}}]}},
            {"meshName": "m", "virtualRouterName": "vr",
             "spec": {"listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}]}},
            {"meshName": "m", "virtualServiceName": "color.local",
             "spec": {"provider": {"virtualRouter": {"virtualRouterName": "vr"}}}},
            {"meshName": "m", "virtualRouterName": "vr", "routeName": "split", "spec": {"httpRoute": {
                "match": {"prefix": "/"},
                "action": {"weightedTargets": [
                    {"virtualNode": "blue", "weight": 80}, {"virtualNode": "red", "weight": 20}]}}}},
        ]),
    );
    let auth = ApiAuth::admin(&work, "agent", AuthFile::default());
    let (key_id, secret) = (auth.key.id.clone(), auth.key.secret.clone());
    let agent = Agent::start_with(
        &work,
        &AgentOpts {
            resources: Some(&resources),
            auth: Some(auth),
            env: vec![("TRELLIS_LOAD_REPORT_INTERVAL_MS".into(), "1000".into())],
            ..AgentOpts::default()
        },
    );
    let mut vpc = Vpc::new(&work, 74);
    let front = vpc.task("front", 2);
    let blue = vpc.task("blue", 3);
    let red = vpc.task("red", 4);
    vpc.start_dns(
        &work,
        &[
            (&blue.ip, "blue.trellis.test color.local"),
            (&red.ip, "red.trellis.test"),
        ],
    );
    let specs = [
        TaskSpec {
            name: "blue",
            node: "blue",
            app: Some((PORT, "blue")),
        },
        TaskSpec {
            name: "red",
            node: "red",
            app: Some((PORT, "red")),
        },
        TaskSpec {
            name: "front",
            node: "front",
            app: None,
        },
    ];
    let mut procs = start_tasks(
        &work,
        &agent,
        "m",
        &[(&blue, &specs[0]), (&red, &specs[1]), (&front, &specs[2])],
        &|_| {},
    );
    eventually("front reaches color.local", Duration::from_secs(30), || {
        front.http_get(None, "http://color.local:9080/").map(|_| ())
    });
    // Live traffic for as long as the test runs.
    procs.push(Proc::spawn(
        "traffic",
        &mut front.cmd(&[
            "sh",
            "-c",
            "while :; do curl -s -o /dev/null http://color.local:9080/; sleep 0.05; done",
        ]),
        work.join("traffic.log"),
    ));
    eventually(
        "the load reports show front's traffic",
        Duration::from_secs(20),
        || {
            let text = check(
                agent
                    .curl()
                    .args(["-sf", &format!("{}/trellis/v1/load", agent.api)]),
            );
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let live = v["edges"].as_array().is_some_and(|es| {
                es.iter()
                    .any(|e| e["caller"] == "virtualNode/front" && e["rps"].as_f64() > Some(0.0))
            });
            if live { Ok(()) } else { Err(text) }
        },
    );

    // The page itself is open (it holds no data); everything it shows comes signed.
    let page = run(agent
        .curl()
        .args(["-s", "-D", "-", "-o", "/dev/null"])
        .arg(format!("{}/ui", agent.api)));
    let head = String::from_utf8_lossy(&page.stdout).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    let (status, _, _) = agent.raw("GET", "/trellis/v1/topology?mesh=m", None);
    assert_eq!(status, 200, "signed, the topology answers");
    let unsigned = run(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/trellis/v1/topology?mesh=m", agent.api),
    ]));
    assert_eq!(
        String::from_utf8_lossy(&unsigned.stdout),
        "403",
        "unsigned, it does not"
    );

    let url = format!(
        "{}/ui#mesh=m&accessKeyId={key_id}&secretAccessKey={secret}",
        agent.api
    );
    let dom = chromium_run(&work, &browser, &url, None);
    for id in [
        "virtualNode/front",
        "virtualNode/blue",
        "virtualNode/red",
        "virtualService/color.local",
        "virtualRouter/vr",
    ] {
        assert!(
            dom.contains(&format!("data-id=\"{id}\"")),
            "{id} drawn:\n{dom}"
        );
    }
    let live_link = dom.split("<path ").any(|p| {
        p.contains("class=\"link live")
            && p.contains("data-from=\"virtualNode/front\"")
            && p.contains("data-to=\"virtualService/color.local\"")
    });
    assert!(live_link, "front → color.local drawn live:\n{dom}");
    assert!(
        dom.contains("split 80%"),
        "the route's weights labelled:\n{dom}"
    );

    let shot = work.join("ui.png");
    chromium_run(&work, &browser, &url, Some(&shot));
    let counts = count_colours(&shot, &[NODE_FILL, LIVE]);
    // Three nodes of 190 × ≥40 px; a live link is a few px wide and hundreds long.
    assert!(
        counts[0] > 3 * 190 * 30,
        "node boxes in the screenshot: {counts:?}"
    );
    assert!(
        counts[1] > 300,
        "live (green) links in the screenshot: {counts:?}"
    );
    if let Ok(dir) = std::env::var("TRELLIS_UI_SCREENSHOT") {
        std::fs::copy(&shot, dir).expect("keep the screenshot");
    }

    // Without credentials: the sign-in form, and no mesh drawn.
    let bare = chromium_run(&work, &browser, &format!("{}/ui", agent.api), None);
    assert!(!bare.contains("data-id=\"virtualNode/front\""), "{bare}");
    drop(procs);
}
