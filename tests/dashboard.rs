//! The dashboard in a real browser: headless Chromium loads the page from `run --serve`, runs
//! its JavaScript, and the numbers it shows must be the API's: the top ads, an ad's and a
//! campaign's series, the health figures. Screenshots at a desktop and a phone size, after a
//! replay and during a follow, go to `target/dashboard-screenshots/`. Chromium is Debian's
//! package, installed by `scripts/ensure-chromium.sh` when missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clickagg::generate::{generate, GenConfig};
use common::follow::{clickagg, s, sigterm};
use common::server::{get, get_json, serve_replay, serving_address, start_feed};
use serde_json::Value;

/// The two viewports every screenshot is taken at: a desktop and a phone.
const VIEWPORTS: [(u32, u32); 2] = [(1440, 900), (390, 844)];

fn chromium() -> String {
    let output = Command::new("bash").arg("scripts/ensure-chromium.sh").output().expect("bash runs");
    assert!(
        output.status.success(),
        "Chromium is needed for this test and could not be installed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Runs headless Chromium on `url` at `viewport` with `extra` flags; returns its stdout.
fn headless(browser: &str, url: &str, viewport: (u32, u32), extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args([
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=6000",
        ])
        .arg(format!("--window-size={},{}", viewport.0, viewport.1))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium runs");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).map(|_| out)
    });
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish with {url} within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.wait().unwrap().success(), "chromium failed on {url}");
    reader.join().unwrap().expect("chromium's output")
}

/// The page's DOM after its scripts ran, as Chromium serializes it, without the scripts' text
/// (which names the attributes and messages the tests look for).
fn rendered_dom(browser: &str, url: &str) -> String {
    let dom = headless(browser, url, VIEWPORTS[0], &["--dump-dom".to_string()]);
    let mut rest = dom.as_str();
    let mut shown = String::new();
    while let Some(start) = rest.find("<script") {
        shown.push_str(&rest[..start]);
        rest = rest[start..].find("</script>").map_or("", |end| &rest[start + end + "</script>".len()..]);
    }
    shown.push_str(rest);
    assert!(shown.contains("data-figure="), "the page's scripts did not run: {dom}");
    shown
}

/// Screenshots of `url` at every viewport, as `target/dashboard-screenshots/{name}-{W}x{H}.png`.
fn screenshots(browser: &str, url: &str, name: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    VIEWPORTS
        .iter()
        .map(|&(w, h)| {
            let path = dir.join(format!("{name}-{w}x{h}.png"));
            let _ = std::fs::remove_file(&path);
            headless(browser, url, (w, h), &[format!("--screenshot={}", path.display())]);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            assert!(size > 10_000, "{} should be a screenshot, not {size} bytes", path.display());
            path
        })
        .collect()
}

/// The value of attribute `name` in the tag text `tag` (from after `<` to before `>`).
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    tag[start..].split('"').next()
}

/// The values of `attributes` on every element that has them all, in page order.
fn elements(dom: &str, attributes: &[&str]) -> Vec<Vec<String>> {
    dom.split('<')
        .skip(1)
        .filter_map(|tag| {
            let tag = &tag[..tag.find('>')?];
            attributes.iter().map(|name| attribute(tag, name).map(str::to_string)).collect()
        })
        .collect()
}

/// [`elements`], parsed as numbers.
fn numbers(dom: &str, attributes: &[&str]) -> Vec<Vec<u64>> {
    elements(dom, attributes).into_iter().map(|row| row.iter().map(|v| v.parse().unwrap()).collect()).collect()
}

/// The number a health figure shows (`data-figure="key"`, then its value's `data-value`).
fn figure(dom: &str, key: &str) -> Option<u64> {
    let at = dom.find(&format!("data-figure=\"{key}\""))?;
    let rest = &dom[at..];
    let start = rest.find("data-value=\"")? + "data-value=\"".len();
    rest[start..].split('"').next()?.parse().ok()
}

/// `(rank, ad, clicks)` of a `popular_ads` answer.
fn ranked(top: &Value) -> Vec<Vec<u64>> {
    top["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ad| vec![ad["rank"].as_u64().unwrap(), ad["ad_id"].as_u64().unwrap(), ad["clicks"].as_u64().unwrap()])
        .collect()
}

/// `(minute, clicks)` of the closed minutes of a series answer.
fn closed_minutes(series: &Value) -> Vec<Vec<u64>> {
    series["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] != "open")
        .map(|m| vec![m["minute"].as_u64().unwrap(), m["clicks"].as_u64().unwrap()])
        .collect()
}

#[test]
fn after_a_replay_the_page_shows_the_apis_numbers() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 60_000, partitions: 3, minutes: 40, ads: 500, seed: 3, ..GenConfig::default() }, &logs).unwrap();
    let served = serve_replay(&logs, &dir.path().join("out"), &["--windows", "5m,60m"]);
    let a = served.address.as_str();
    let home = format!("http://{a}/");

    // Defaults: the first configured window, every country, the top ad charted.
    let dom = rendered_dom(&browser, &home);
    let top = get_json(a, "/v1/ads/popular_ads?window=5m&count=100");
    let want = ranked(&top);
    assert!(want.len() > 10, "the data set should fill the table");
    assert_eq!(numbers(&dom, &["data-rank", "data-ad", "data-clicks"]), want, "the top table differs from the API");
    let boundary = top["as_of_minute"].as_u64().unwrap();
    let best = want[0][1];
    let series = get_json(a, &format!("/v1/ads/{best}/series?from={}&to={boundary}", boundary - 30));
    let bars = numbers(&dom, &["data-minute", "data-clicks"]);
    assert_eq!(bars.len(), 30, "the chart should show the last 30 minutes");
    assert_eq!(bars, closed_minutes(&series), "the chart of ad {best} differs from the API");
    assert!(!dom.contains("data-open-minute"), "a finished replay has no open minute");
    assert!(dom.contains(&format!("Clicks per minute — ad {best}")));

    // Health: the figures are the status's.
    let status = get_json(a, "/v1/status");
    for key in ["duplicates", "late", "too_late", "malformed", "clicks", "watermark"] {
        assert_eq!(figure(&dom, key), status[key].as_u64(), "health figure {key}");
    }
    assert_eq!(figure(&dom, "pending"), Some(0));
    assert_eq!(figure(&dom, "lag"), Some(0), "a finished replay has no lag");
    let reasons: Vec<(String, u64)> =
        elements(&dom, &["data-reason", "data-count"]).into_iter().map(|r| (r[0].clone(), r[1].parse().unwrap())).collect();
    let mut want_reasons: Vec<(String, u64)> =
        status["dead_letters"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    want_reasons.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let mut shown = reasons.clone();
    shown.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    assert_eq!(shown, want_reasons, "dead letters by reason");
    assert!(!want_reasons.is_empty(), "the generator writes bad lines");
    assert_eq!(elements(&dom, &["data-partition"]).len(), 3, "a row per partition");
    // Times are UTC on the page, local on hover.
    assert!(dom.contains("title=\"") && dom.contains("local time"), "times carry their local time on hover");

    // A view from the address: another ad (as a click on its row sets it), another window and a
    // country.
    let other = want[3][1];
    let country = {
        let top_in = |c: &str| get_json(a, &format!("/v1/ads/popular_ads?window=60m&count=100&country={c}"));
        ["US", "DE", "GB", "FR", "JP", "BR", "IN"].into_iter().find(|c| !top_in(c)["ads"].as_array().unwrap().is_empty()).unwrap()
    };
    let dom = rendered_dom(&browser, &format!("{home}#window=60m&country={country}&ad={other}"));
    let top = get_json(a, &format!("/v1/ads/popular_ads?window=60m&count=100&country={country}"));
    assert_eq!(numbers(&dom, &["data-rank", "data-ad", "data-clicks"]), ranked(&top), "the top in {country} over 60m");
    let series = get_json(a, &format!("/v1/ads/{other}/series?from={}&to={boundary}&country={country}", boundary - 30));
    assert_eq!(numbers(&dom, &["data-minute", "data-clicks"]), closed_minutes(&series), "ad {other} in {country}");
    assert!(dom.contains(&format!("Clicks per minute — ad {other} in {country}")));

    // A campaign's series.
    let campaign = get_json(a, &format!("/v1/campaigns/1/series?from={}&to={boundary}", boundary - 30));
    let dom = rendered_dom(&browser, &format!("{home}#campaign=1"));
    assert_eq!(numbers(&dom, &["data-minute", "data-clicks"]), closed_minutes(&campaign), "campaign 1");
    assert!(dom.contains("Clicks per minute — campaign 1"));

    screenshots(&browser, &home, "replay");
}

/// A follower of logs that `clickagg feed` writes, serving: stderr is drained, the address read.
struct Follow {
    feed: Child,
    follower: Child,
    address: String,
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.feed.kill();
        let _ = self.feed.wait();
        sigterm(&self.follower);
        let _ = self.follower.wait();
    }
}

fn follow(dir: &Path, seconds: u32) -> Follow {
    let (logs, store) = (dir.join("logs"), dir.join("store.sqlite"));
    let feed = start_feed(&logs, 3, &["--rate", "2000", "--duration", &format!("{seconds}s"), "--ads", "300"]);
    let mut follower = clickagg()
        .args(["run", "--logs", s(&logs), "--store", s(&store), "--follow", "--windows", "5m,60m", "--serve", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = serving_address(&mut follower);
    Follow { feed, follower, address }
}

/// The status once `ready` holds, polled for up to `within`.
fn status_when(address: &str, within: Duration, ready: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (code, body) = get(address, "/v1/status", &[]);
        if code == 200 {
            let status: Value = serde_json::from_str(&body).unwrap();
            if ready(&status) {
                return status;
            }
        }
        assert!(started.elapsed() < within, "the status did not get there within {within:?}: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn during_a_follow_the_page_shows_the_open_minute_and_health() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    // Start early in a minute, so that the page is seen (and photographed) before it closes.
    let second_of_minute = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 60;
    while second_of_minute() > 15 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let fed = follow(dir.path(), 150);
    let a = fed.address.as_str();
    let home = format!("http://{a}/");

    // The first minutes: clicks counted so far in the open minute, none of the window closed.
    let before = status_when(a, Duration::from_secs(30), |s| s["clicks"].as_u64() > Some(1000));
    let first_open = before["as_of_minute"].as_u64().unwrap();
    let dom = rendered_dom(&browser, &home);
    let after = get_json(a, "/v1/status");
    assert_eq!(figure(&dom, "duplicates"), Some(0), "feed writes no duplicates");
    let shown_clicks = figure(&dom, "clicks").unwrap();
    assert!(before["clicks"].as_u64().unwrap() <= shown_clicks && shown_clicks <= after["clicks"].as_u64().unwrap());
    let rows = numbers(&dom, &["data-rank", "data-ad", "data-clicks"]);
    assert!(!rows.is_empty(), "the page should show the clicks counted so far, not an empty top");
    // Started early in a minute, the page is seen before that minute closes: the top is the open
    // minute's so far, labelled, each count at most what the API says a moment later.
    assert!(dom.contains("data-provisional=\"true\""), "the first minute should show its clicks so far, as provisional");
    {
        assert!(dom.contains("No minute of the window has closed yet"), "the provisional top should say what it is");
        let open = numbers(&dom, &["data-open-top-minute"])[0][0];
        for row in &rows {
            let later = get_json(a, &format!("/v1/ads/{}/aggregated_count?from={open}&to={}", row[1], open + 1));
            assert!(row[2] <= later["clicks"].as_u64().unwrap(), "ad {}: the page shows {}, the API {later}", row[1], row[2]);
        }
        screenshots(&browser, &home, "follow-first-minute");
    }

    // Once a minute has closed: its clicks are charted, and the open minute is marked.
    status_when(a, Duration::from_secs(100), |s| s["as_of_minute"].as_u64() > Some(first_open));
    let dom = rendered_dom(&browser, &home);
    let status = get_json(a, "/v1/status");
    let boundary = status["as_of_minute"].as_u64().unwrap();
    assert!(!dom.contains("has closed yet"), "a minute of the window has closed");
    let rows = numbers(&dom, &["data-rank", "data-ad", "data-clicks"]);
    assert!(!rows.is_empty(), "the top table should list the ads of the closed minute");
    let charted = rows[0][1];
    let open: Vec<Vec<u64>> = numbers(&dom, &["data-open-minute"]);
    assert_eq!(open.len(), 1, "one open minute");
    assert!(open[0][0] <= boundary && open[0][0] + 1 >= boundary, "the open minute is the watermark's");
    // The closed minutes' counts are final or provisional; the page's must be the API's for the
    // same minutes (a later watermark can only have corrected a provisional one upward).
    let series = get_json(a, &format!("/v1/ads/{charted}/series?from={}&to={}", boundary - 30, boundary));
    let api: std::collections::BTreeMap<u64, u64> = closed_minutes(&series).into_iter().map(|r| (r[0], r[1])).collect();
    let bars = numbers(&dom, &["data-minute", "data-clicks"]);
    assert!(bars.iter().any(|b| b[1] > 0), "the charted ad had clicks");
    for bar in &bars {
        let later = api.get(&bar[0]).copied().unwrap_or(0);
        assert!(bar[1] <= later, "minute {}: the page shows {} clicks, the API {later}", bar[0], bar[1]);
    }
    assert_eq!(figure(&dom, "duplicates"), Some(0));
    screenshots(&browser, &home, "follow");
}
