//! The README's first command: `vero-proxy demo` starts, its printed commands work as printed,
//! and Ctrl-C leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Demo {
    child: Child,
    banner: String,
}

impl Demo {
    fn start() -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vero-proxy"))
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !banner.contains("Press Ctrl-C") {
            assert!(Instant::now() < deadline, "no banner: {banner}");
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("demo exited early: {banner}");
            }
            banner.push_str(&line);
        }
        // Keep draining stdout so the demo never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        Demo { child, banner }
    }

    fn commands(&self) -> Vec<String> {
        self.banner
            .lines()
            .filter(|l| l.starts_with("curl "))
            .map(str::to_owned)
            .collect()
    }

    fn temp_dir(&self) -> std::path::PathBuf {
        let line = self
            .banner
            .lines()
            .find(|l| l.contains("vero-proxy-demo-"))
            .expect("temp dir not shown");
        std::path::PathBuf::from(line.trim().trim_end_matches('.'))
    }

    /// Ctrl-C, then the exit status.
    fn interrupt(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(self.child.wait());
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("demo did not stop on Ctrl-C")
            .unwrap()
    }
}

fn url_in(cmd: &str) -> String {
    cmd.split_whitespace()
        .map(|w| w.trim_matches('\''))
        .find(|w| w.starts_with("http://"))
        .expect("no URL in the command")
        .to_owned()
}

#[tokio::test]
async fn demo_forwards_with_the_client_certificate_and_cleans_up() {
    let demo = Demo::start();
    let cmds = demo.commands();
    assert_eq!(cmds.len(), 4, "{}", demo.banner);
    assert!(demo.banner.contains("not Vero API"));
    let dir = demo.temp_dir();
    assert!(dir.join("client.key").exists());

    let url: http::Uri = url_in(&cmds[0]).parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(url.authority().unwrap().as_str())
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(url.path_and_query().unwrap().as_str())
        .header("host", url.authority().unwrap().as_str())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen["client_certificate"]["subject"],
        "CN=1234567-1, O=Demo Payroll Oy, C=FI"
    );
    assert_eq!(seen["query"], "taxNumber=FI12345671");

    assert!(demo.interrupt().success());
    assert!(!dir.exists(), "the demo left {} behind", dir.display());
}

#[test]
#[ignore = "needs curl"]
fn demo_commands_work_as_printed_with_curl() {
    let demo = Demo::start();
    let cmds = demo.commands();
    let run = |c: &str| {
        let out = Command::new("sh").args(["-c", c]).output().expect("sh");
        assert!(out.status.success(), "{c} failed: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(run(&cmds[0]).contains("CN=1234567-1"));
    let posted = run(&cmds[1]);
    assert!(posted.contains("\"body_bytes\": 26"), "{posted}");
    assert!(posted.contains("vero-softwarekey"), "{posted}");
    let refused = run(&cmds[2]);
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("cross_site_request"));
    assert!(run(&cmds[3]).contains("ready"));
    assert!(demo.interrupt().success());
}
