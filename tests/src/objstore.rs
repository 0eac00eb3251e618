//! A real S3-compatible server for tests (moto's, from the project venv) on
//! 127.0.0.1, and a TCP proxy in front of it that counts the bytes the server
//! sends: the tests' own measure of what a client fetched.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// `moto_server` on a free port of 127.0.0.1; killed when dropped.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Moto {
    /// Starts the server and waits for its "Running on" line.
    pub fn start() -> Moto {
        let exe = crate::python().with_file_name("moto_server");
        let mut child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", exe.display()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
        let mut seen = String::new();
        let addr = loop {
            let mut line = String::new();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("moto_server exited before listening: {seen}");
            }
            seen.push_str(&line);
            if let Some(rest) = line.split("Running on http://").nth(1) {
                break rest.trim().parse::<SocketAddr>().unwrap_or_else(|e| panic!("{line}: {e}"));
            }
        };
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
        });
        Moto { child, addr }
    }

    /// CPU seconds (user + system) the server has used so far (Linux).
    pub fn cpu_seconds(&self) -> f64 {
        crate::server::process_cpu_seconds(&self.child.id().to_string())
    }

    /// Creates `bucket`.
    pub fn bucket(&self, bucket: &str) {
        let r = crate::http::request(self.addr, "PUT", &format!("/{bucket}"), &[], b"").expect("create bucket");
        assert_eq!(r.status, 200, "create bucket {bucket}: {}", r.text());
    }

    /// Stores `bytes` at `bucket/key`, readable without credentials (as a public bucket's objects are, so that
    /// plain HTTP clients can read them too).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let acl = [("x-amz-acl", "public-read")];
        let r = crate::http::request(self.addr, "PUT", &format!("/{bucket}/{key}"), &acl, bytes).expect("put");
        assert_eq!(r.status, 200, "put {bucket}/{key}: {}", r.text());
    }

    /// The object at `bucket/key`, if any.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let r = crate::http::request(self.addr, "GET", &format!("/{bucket}/{key}"), &[], b"").expect("get");
        (r.status == 200).then_some(r.body)
    }

    /// The keys under `prefix` in `bucket` (from the ListObjectsV2 XML).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let r = crate::http::request(self.addr, "GET", &format!("/{bucket}?list-type=2&prefix={prefix}"), &[], b"")
            .expect("list");
        r.text().split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(str::to_string).collect()
    }

    /// Copies every object under `prefix` of `bucket` into `dir` (file names relative to the prefix), with
    /// boto3 and the test credentials: objects written by the code under test are not public in moto.
    pub fn download(&self, bucket: &str, prefix: &str, dir: &std::path::Path) {
        let o = std::process::Command::new(crate::python())
            .arg("-c")
            .arg(
                "import boto3, pathlib, sys\n\
                 s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='testing', \
                 aws_secret_access_key='testing', region_name='us-east-1')\n\
                 bucket, prefix, out = sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4])\n\
                 for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get('Contents', []):\n\
                 \x20   dest = out / o['Key'][len(prefix):]\n\
                 \x20   dest.parent.mkdir(parents=True, exist_ok=True)\n\
                 \x20   s3.download_file(bucket, o['Key'], str(dest))\n",
            )
            .arg(format!("http://{}", self.addr))
            .args([bucket, prefix])
            .arg(dir)
            .output()
            .expect("run python");
        assert!(o.status.success(), "downloading s3://{bucket}/{prefix}: {}", crate::text(&o));
    }

    /// Environment for clients of `endpoint` (this server, or a proxy before it).
    pub fn env(endpoint: SocketAddr) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", format!("http://{endpoint}")),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on 127.0.0.1 to `target` that counts the bytes coming back, and can be taken down: while
/// down, it closes every new connection at once and cuts open ones at their next byte (a store outage as
/// clients see it: connections reset, requests unanswered).
#[derive(Debug, Clone)]
pub struct CountingProxy {
    pub addr: SocketAddr,
    received: Arc<AtomicU64>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl CountingProxy {
    pub fn start(target: SocketAddr) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(AtomicU64::new(0));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, is_down) = (received.clone(), down.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if is_down.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else { continue };
                let (count, d1, d2) = (count.clone(), is_down.clone(), is_down.clone());
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                std::thread::spawn(move || pump(c2, s2, None, d1));
                std::thread::spawn(move || pump(server, client, Some(count), d2));
            }
        });
        CountingProxy { addr, received, down }
    }

    /// Takes the proxy down (connections refused and cut) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Bytes sent back to clients so far (headers included).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    count: Option<Arc<AtomicU64>>,
    down: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) if down.load(Ordering::SeqCst) => {
                let _ = from.shutdown(std::net::Shutdown::Both);
                let _ = to.shutdown(std::net::Shutdown::Both);
                return;
            }
            Ok(n) => {
                if let Some(c) = &count {
                    c.fetch_add(n as u64, Ordering::SeqCst);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
