//! A fault-injecting DynamoDB stand-in between the agents and moto. moto applies a transaction in
//! one step under one lock, so it never shows what DynamoDB's documented isolation allows: Query
//! and separate GetItems are only read-committed against a `TransactWriteItems`, whose items are
//! applied one by one (AWS, "Isolation levels for DynamoDB transactions"). The stand-in does:
//!
//! - it applies a transaction's items one at a time, in random order with pauses between them
//!   ([`StandIn::reorder`]), or holding chosen items back until the test releases them
//!   ([`StandIn::hold`]), while every other call passes through and sees the items applied so far;
//! - until an item is applied it is locked, as DynamoDB locks it between prepare and commit: a
//!   `TransactWriteItems` or `TransactGetItems` that touches it is cancelled with
//!   `TransactionConflict` (AWS, "Transaction conflict handling in DynamoDB");
//! - it fails chosen calls ([`StandIn::fail`]), expires change items as time to live would
//!   ([`StandIn::expire_changes`]) and deletes the table ([`StandIn::delete_table`]).
//!
//! Conditions and limits stay moto's: before applying anything the stand-in sends moto the whole
//! transaction plus a condition check that always fails, so moto evaluates every condition and
//! validation and rolls everything back (a dry run); only a transaction that passed is applied.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::Moto;

/// (table, pk, sk): the items of our table.
type ItemKey = (String, String, String);

/// A call the stand-in answers with an error instead of passing it on.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Every call fails with a 500 `InternalServerError` (the SDK retries, then gives up).
    Outage,
    /// Calls of `op` (`TransactWriteItems`, `Query`, …) fail with this error.
    Error {
        op: String,
        status: u16,
        code: String,
        message: String,
    },
}

/// Which items of a transaction to hold back: `(pk, sk) -> hold?`.
type HoldRule = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// The stand-in: an HTTP endpoint speaking DynamoDB's JSON protocol, on its own runtime.
pub struct StandIn {
    pub endpoint: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    moto: SocketAddr,
    control: Mutex<Control>,
    /// Serialises the prepare step of write transactions (lock check, dry run, locking) and the
    /// lock check of read transactions with what they forward.
    gate: tokio::sync::Mutex<()>,
    /// Bumped by [`StandIn::release`].
    release: watch::Sender<u64>,
}

#[derive(Default)]
struct Control {
    /// Apply every transaction item by item in random order, pausing up to this long between.
    reorder: Option<Duration>,
    /// The next transaction with an item this matches holds those items until released.
    hold: Option<HoldRule>,
    fault: Option<Fault>,
    /// Items of transactions in flight that are not applied yet.
    locked: HashMap<ItemKey, u64>,
    calls: HashMap<String, u64>,
    conflicts: u64,
    /// Transactions waiting for [`StandIn::release`].
    held: u64,
    /// The last request's signature header: moto reads the region from it.
    authorization: Option<String>,
    next_txn: u64,
    rng: u64,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl StandIn {
    /// A stand-in in front of `moto`, passing everything through until told otherwise.
    pub fn start(moto: &Moto) -> Self {
        let moto_addr: SocketAddr = moto
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("moto endpoint is host:port");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("stand-in runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind the stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let shared = Arc::new(Shared {
            moto: moto_addr,
            control: Mutex::new(Control {
                rng: seed,
                ..Control::default()
            }),
            gate: tokio::sync::Mutex::new(()),
            release: watch::channel(0).0,
        });
        let s = shared.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(s.clone(), stream));
            }
        });
        StandIn {
            endpoint: format!("http://{addr}"),
            shared,
            runtime: Some(runtime),
        }
    }

    /// `--store dynamodb` flags for an agent on `table` through the stand-in.
    pub fn store_args(&self, table: &str) -> Vec<String> {
        super::store_args(&self.endpoint, table)
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Every transaction from now on is applied item by item in random order, with a pause of
    /// up to `max_pause` before each item.
    pub fn reorder(&self, max_pause: Duration) {
        self.control().reorder = Some(max_pause);
    }

    /// The next transaction with an item that `rule(pk, sk)` matches applies its other items,
    /// answers the caller (the transaction is committed), and applies the matching items only
    /// after [`StandIn::release`]; until then they stay locked.
    pub fn hold(&self, rule: impl Fn(&str, &str) -> bool + Send + Sync + 'static) {
        self.control().hold = Some(Box::new(rule));
    }

    /// How many transactions are waiting for [`StandIn::release`].
    pub fn held(&self) -> u64 {
        self.control().held
    }

    /// Lets held transactions apply the rest of their items.
    pub fn release(&self) {
        self.shared.release.send_modify(|n| *n += 1);
    }

    /// Answers calls with `fault` until [`StandIn::heal`].
    pub fn fail(&self, fault: Fault) {
        self.control().fault = Some(fault);
    }

    pub fn heal(&self) {
        self.control().fault = None;
    }

    /// Calls of `op` received so far (also those answered with a fault).
    pub fn calls(&self, op: &str) -> u64 {
        self.control().calls.get(op).copied().unwrap_or(0)
    }

    /// Transactions (write or read) cancelled because an item was locked.
    pub fn conflicts(&self) -> u64 {
        self.control().conflicts
    }

    /// Deletes every change item of `table`, as time to live does a day after each was written.
    /// Returns how many there were.
    pub fn expire_changes(&self, table: &str) -> usize {
        let shared = self.shared.clone();
        let table = table.to_string();
        self.block_on(async move {
            let mut deleted = 0;
            loop {
                let page = moto_call(
                    &shared,
                    "Query",
                    &json!({"TableName": table, "ConsistentRead": true,
                        "KeyConditionExpression": "pk = :pk",
                        "ExpressionAttributeValues": {":pk": {"S": "change"}}}),
                )
                .await;
                let items = page["Items"].as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    return deleted;
                }
                for item in items {
                    moto_call(
                        &shared,
                        "DeleteItem",
                        &json!({"TableName": table, "Key": {"pk": item["pk"], "sk": item["sk"]}}),
                    )
                    .await;
                    deleted += 1;
                }
            }
        })
    }

    /// Deletes `table` with everything in it.
    pub fn delete_table(&self, table: &str) {
        let shared = self.shared.clone();
        let body = json!({ "TableName": table });
        self.block_on(async move { moto_call(&shared, "DeleteTable", &body).await });
    }

    /// The table's generation item, as a consistent read sees it.
    pub fn meta(&self, table: &str) -> Value {
        let shared = self.shared.clone();
        let body = json!({"TableName": table, "ConsistentRead": true,
            "Key": {"pk": {"S": "meta"}, "sk": {"S": "generation"}}});
        self.block_on(async move { moto_call(&shared, "GetItem", &body).await["Item"].clone() })
    }

    fn block_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let rt = self.runtime.as_ref().expect("stand-in running");
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("stand-in task")
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Held transactions end with the runtime.
        self.release();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

// === HTTP ===

#[derive(Debug)]
struct Request {
    head: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, body: &Value) -> Self {
        Response {
            status,
            headers: vec![("content-type".into(), "application/x-amz-json-1.0".into())],
            body: body.to_string().into_bytes(),
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Response::json(
            status,
            &json!({"__type": format!("com.amazonaws.dynamodb.v20120810#{code}"), "message": message}),
        )
    }

    /// A cancelled transaction: `reasons` per item, `None` for the items that were fine.
    fn cancelled(reasons: &[Option<&str>]) -> Self {
        let codes: Vec<&str> = reasons.iter().map(|r| r.unwrap_or("None")).collect();
        let list: Vec<Value> = reasons
            .iter()
            .map(|r| match r {
                Some("TransactionConflict") => {
                    json!({"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"})
                }
                Some(code) => json!({"Code": code}),
                None => json!({"Code": "None"}),
            })
            .collect();
        Response::json(
            400,
            &json!({
                "__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
                "Message": format!("Transaction cancelled, please refer cancellation reasons for specific reasons [{}]", codes.join(", ")),
                "CancellationReasons": list,
            }),
        )
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    while let Some(req) = read_request(&mut r, &mut w).await {
        let resp = handle(&shared, req).await;
        if write_response(&mut w, &resp, true).await.is_err() {
            return;
        }
    }
}

async fn read_request(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Option<Request> {
    let mut head = String::new();
    if r.read_line(&mut head).await.ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut req = Request {
        head: head.trim_end().to_string(),
        headers,
        body: Vec::new(),
    };
    if req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.ok()?;
    }
    let len: usize = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    req.body = body;
    Some(req)
}

async fn write_response(
    w: &mut (impl AsyncWriteExt + Unpin),
    resp: &Response,
    keep_alive: bool,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n", resp.body.len()));
    if !keep_alive {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes()).await?;
    w.write_all(&resp.body).await?;
    w.flush().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// One request to moto on a fresh connection, read to the end.
async fn roundtrip(moto: SocketAddr, req: &Request) -> Response {
    let failed = |e: String| Response::error(500, "InternalServerError", &format!("moto: {e}"));
    let mut stream = match TcpStream::connect(moto).await {
        Ok(s) => s,
        Err(e) => return failed(e.to_string()),
    };
    let mut out = format!("{}\r\n", req.head);
    for (k, v) in &req.headers {
        if !matches!(
            k.as_str(),
            "connection" | "content-length" | "expect" | "transfer-encoding"
        ) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        req.body.len()
    ));
    if let Err(e) = async {
        stream.write_all(out.as_bytes()).await?;
        stream.write_all(&req.body).await?;
        stream.flush().await
    }
    .await
    {
        return failed(e.to_string());
    }
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw).await {
        return failed(e.to_string());
    }
    parse_response(&raw).unwrap_or_else(|| failed("unreadable response".into()))
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut rest = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
        match k.as_str() {
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "content-length" => length = v.parse::<usize>().ok(),
            "connection" | "keep-alive" => {}
            _ => headers.push((k, v)),
        }
    }
    if chunked {
        rest = dechunk(&rest)?;
    } else if let Some(n) = length {
        rest.truncate(n);
    }
    Some(Response {
        status,
        headers,
        body: rest,
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).ok()?.trim(), 16).ok()?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// A call of the stand-in's own (expiring items, deleting the table), signed like the agents'
/// last call so moto picks the same region; the decoded JSON answer.
async fn moto_call(shared: &Shared, op: &str, body: &Value) -> Value {
    let auth = lock(shared).authorization.clone().unwrap_or_else(|| {
        "AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0".into()
    });
    let req = Request {
        head: "POST / HTTP/1.1".into(),
        headers: vec![
            ("host".into(), shared.moto.to_string()),
            ("content-type".into(), "application/x-amz-json-1.0".into()),
            ("x-amz-target".into(), format!("DynamoDB_20120810.{op}")),
            ("authorization".into(), auth),
        ],
        body: body.to_string().into_bytes(),
    };
    let resp = roundtrip(shared.moto, &req).await;
    serde_json::from_slice(&resp.body).unwrap_or(Value::Null)
}

/// `req` with another operation and body (the agent's headers, so the same region).
fn derived(req: &Request, op: &str, body: &Value) -> Request {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .filter(|(k, _)| k != "x-amz-target" && k != "x-amz-crc32")
        .cloned()
        .collect();
    headers.push(("x-amz-target".into(), format!("DynamoDB_20120810.{op}")));
    Request {
        head: req.head.clone(),
        headers,
        body: body.to_string().into_bytes(),
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Control> {
    shared.control.lock().unwrap_or_else(|p| p.into_inner())
}

// === DynamoDB ===

async fn handle(shared: &Arc<Shared>, req: Request) -> Response {
    let op = req
        .header("x-amz-target")
        .and_then(|t| t.split_once('.'))
        .map(|(_, op)| op.to_string())
        .unwrap_or_default();
    let fault = {
        let mut c = lock(shared);
        *c.calls.entry(op.clone()).or_default() += 1;
        if let Some(a) = req.header("authorization") {
            c.authorization = Some(a.to_string());
        }
        c.fault.clone()
    };
    match fault {
        Some(Fault::Outage) => {
            return Response::error(500, "InternalServerError", "the stand-in's outage");
        }
        Some(Fault::Error {
            op: failing,
            status,
            code,
            message,
        }) if failing == op => return Response::error(status, &code, &message),
        _ => {}
    }
    match op.as_str() {
        "TransactWriteItems" => transact_write(shared, req).await,
        "TransactGetItems" => transact_get(shared, req).await,
        _ => roundtrip(shared.moto, &req).await,
    }
}

fn body_of(req: &Request) -> Value {
    serde_json::from_slice(&req.body).unwrap_or(Value::Null)
}

/// The action of one `TransactItems` entry: (kind, its parameters).
fn action(item: &Value) -> Option<(&str, &Map<String, Value>)> {
    let (kind, op) = item.as_object()?.iter().next()?;
    Some((kind.as_str(), op.as_object()?))
}

fn key_of(item: &Value) -> ItemKey {
    let (kind, op) = action(item).unwrap_or(("", &EMPTY));
    let key = if kind == "Put" {
        &op["Item"]
    } else {
        &op["Key"]
    };
    let s = |v: &Value| v["S"].as_str().unwrap_or_default().to_string();
    (
        op.get("TableName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        s(&key["pk"]),
        s(&key["sk"]),
    )
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

/// A read transaction: cancelled while any of its items is locked, else moto's answer.
async fn transact_get(shared: &Arc<Shared>, req: Request) -> Response {
    let body = body_of(&req);
    let keys: Vec<ItemKey> = body["TransactItems"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    let get = &i["Get"];
                    let s = |v: &Value| v["S"].as_str().unwrap_or_default().to_string();
                    (
                        get["TableName"].as_str().unwrap_or_default().to_string(),
                        s(&get["Key"]["pk"]),
                        s(&get["Key"]["sk"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let _gate = shared.gate.lock().await;
    let reasons: Vec<Option<&str>> = {
        let c = lock(shared);
        keys.iter()
            .map(|k| c.locked.contains_key(k).then_some("TransactionConflict"))
            .collect()
    };
    if reasons.iter().any(Option::is_some) {
        lock(shared).conflicts += 1;
        return Response::cancelled(&reasons);
    }
    roundtrip(shared.moto, &req).await
}

/// A write transaction: passed to moto whole, or applied item by item (see the module docs).
async fn transact_write(shared: &Arc<Shared>, req: Request) -> Response {
    let body = body_of(&req);
    let items: Vec<Value> = body["TransactItems"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let keys: Vec<ItemKey> = items.iter().map(key_of).collect();
    let gate = shared.gate.lock().await;
    let (reasons, reorder, held, txn) = {
        let mut c = lock(shared);
        let reasons: Vec<Option<&str>> = keys
            .iter()
            .map(|k| c.locked.contains_key(k).then_some("TransactionConflict"))
            .collect();
        let held: Vec<bool> = match &c.hold {
            Some(rule) => keys.iter().map(|(_, pk, sk)| rule(pk, sk)).collect(),
            None => vec![false; keys.len()],
        };
        c.next_txn += 1;
        (reasons, c.reorder, held, c.next_txn)
    };
    if reasons.iter().any(Option::is_some) {
        lock(shared).conflicts += 1;
        return Response::cancelled(&reasons);
    }
    let holding = held.iter().any(|h| *h);
    if reorder.is_none() && !holding {
        // moto applies it whole, under the gate, so no item-by-item transaction interleaves.
        return roundtrip(shared.moto, &req).await;
    }
    // Dry run: moto checks conditions and limits, then rolls back (the last check always fails).
    let table = keys.first().map(|k| k.0.clone()).unwrap_or_default();
    let mut dry = items.clone();
    dry.push(json!({"ConditionCheck": {"TableName": table,
        "Key": {"pk": {"S": "trellis-standin"}, "sk": {"S": "dry-run"}},
        "ConditionExpression": "attribute_exists(pk)"}}));
    let answer = roundtrip(
        shared.moto,
        &derived(&req, "TransactWriteItems", &json!({"TransactItems": dry})),
    )
    .await;
    let parsed: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let cancelled = parsed["__type"]
        .as_str()
        .is_some_and(|t| t.ends_with("TransactionCanceledException"));
    if !cancelled {
        // A validation error (or anything else moto said about the whole request).
        return answer;
    }
    let codes: Vec<Option<String>> = parsed["CancellationReasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .take(items.len())
                .map(|r| {
                    r["Code"]
                        .as_str()
                        .filter(|c| *c != "None")
                        .map(String::from)
                })
                .collect()
        })
        .unwrap_or_default();
    if codes.iter().any(Option::is_some) {
        let reasons: Vec<Option<&str>> = codes.iter().map(|c| c.as_deref()).collect();
        return Response::cancelled(&reasons);
    }
    {
        let mut c = lock(shared);
        for k in &keys {
            c.locked.insert(k.clone(), txn);
        }
        if holding {
            c.hold = None;
        }
    }
    drop(gate);

    // The order: held items last; with reordering, shuffled within each group.
    let mut order: Vec<usize> = (0..items.len()).collect();
    if reorder.is_some() {
        let mut c = lock(shared);
        for i in (1..order.len()).rev() {
            let j = (next_random(&mut c.rng) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order.sort_by_key(|i| held[*i]);
    let (answer_tx, answer_rx) = oneshot::channel();
    let shared2 = shared.clone();
    let req_headers = Request {
        head: req.head.clone(),
        headers: req.headers.clone(),
        body: Vec::new(),
    };
    tokio::spawn(async move {
        let mut answer = Some(answer_tx);
        for i in order {
            if held[i]
                && let Some(tx) = answer.take()
            {
                // Committed: the caller hears so; the held items are still on their way.
                let mut release = shared2.release.subscribe();
                lock(&shared2).held += 1;
                let _ = tx.send(Response::json(200, &json!({})));
                let _ = release.changed().await;
                lock(&shared2).held -= 1;
            }
            if let Some(max) = reorder {
                let pause = {
                    let mut c = lock(&shared2);
                    next_random(&mut c.rng) % (max.as_micros() as u64 + 1)
                };
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
            apply(&shared2, &req_headers, &items[i]).await;
            lock(&shared2).locked.remove(&keys[i]);
        }
        if let Some(tx) = answer {
            let _ = tx.send(Response::json(200, &json!({})));
        }
    });
    answer_rx
        .await
        .unwrap_or_else(|_| Response::error(500, "InternalServerError", "stand-in task ended"))
}

/// One item of a transaction that passed its dry run, as a plain write without its condition.
async fn apply(shared: &Shared, req: &Request, item: &Value) {
    let Some((kind, op)) = action(item) else {
        return;
    };
    let mut body = Map::new();
    body.insert("TableName".into(), op["TableName"].clone());
    let target = match kind {
        "Put" => {
            body.insert("Item".into(), op["Item"].clone());
            "PutItem"
        }
        "Delete" => {
            body.insert("Key".into(), op["Key"].clone());
            "DeleteItem"
        }
        "Update" => {
            let expr = op["UpdateExpression"].as_str().unwrap_or_default();
            body.insert("Key".into(), op["Key"].clone());
            body.insert("UpdateExpression".into(), expr.into());
            for attrs in ["ExpressionAttributeNames", "ExpressionAttributeValues"] {
                if let Some(all) = op.get(attrs).and_then(Value::as_object) {
                    let used: Map<String, Value> = all
                        .iter()
                        .filter(|(k, _)| mentions(expr, k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    body.insert(attrs.into(), Value::Object(used));
                }
            }
            "UpdateItem"
        }
        _ => return,
    };
    roundtrip(shared.moto, &derived(req, target, &Value::Object(body))).await;
}

/// Whether `expr` uses the placeholder `name` (`#g`, `:next`) as a whole token.
fn mentions(expr: &str, name: &str) -> bool {
    expr.match_indices(name).any(|(at, _)| {
        expr[at + name.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

fn next_random(state: &mut u64) -> u64 {
    // xorshift64*: enough to shuffle items and pick pauses.
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}
