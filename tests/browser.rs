//! The status page in a real headless browser (Debian's chromium): it renders, shows the
//! identity, and colours the days left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is not installed (apt-get install chromium)")
}

/// Runs headless chromium with `args` against `url`; its stdout.
fn browse(profile: &std::path::Path, args: &[&str], url: &str) -> Vec<u8> {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("cannot run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs chromium"]
async fn the_status_page_renders_in_a_browser() {
    let s = Setup::new(&[]).await;
    let url = format!("http://{}/", s.proxy.admin);
    let profile = tempfile::tempdir().unwrap();
    let (dom, shot) = {
        let p = profile.path().to_path_buf();
        let url2 = url.clone();
        tokio::task::spawn_blocking(move || {
            let dom = browse(&p, &["--dump-dom"], &url2);
            let shot_path = p.join("page.png");
            browse(
                &p,
                &[
                    &format!("--screenshot={}", shot_path.display()),
                    "--window-size=1000,900",
                ],
                &url2,
            );
            (dom, std::fs::read(&shot_path).unwrap_or_default())
        })
        .await
        .unwrap()
    };
    let dom = String::from_utf8(dom).unwrap();
    // The DOM the browser built, not just our HTML text.
    assert!(dom.contains("CN=1234567-1, O=Testi Oy, C=FI"), "{dom}");
    assert!(dom.contains(r#"id="days-left" class="days ok""#), "{dom}");
    assert!(dom.contains("vero-proxy"));
    assert!(shot.starts_with(b"\x89PNG"), "no screenshot");
    assert!(
        shot.len() > 10_000,
        "the screenshot is suspiciously small ({} bytes)",
        shot.len()
    );
    if let Ok(dir) = std::env::var("VERO_PROXY_SCREENSHOT_DIR") {
        std::fs::write(std::path::Path::new(&dir).join("status-page.png"), &shot).unwrap();
    }
}
