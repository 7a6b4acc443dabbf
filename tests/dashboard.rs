//! The dashboard in a real browser: headless Chromium loads the page from `run --serve`, runs
//! its JavaScript, and the numbers it shows must be the API's. Chromium is Debian's package,
//! installed by `scripts/ensure-chromium.sh` when missing.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clickagg::generate::{generate, GenConfig};
use common::server::{get_json, serve_replay};

fn chromium() -> String {
    let output = Command::new("bash").arg("scripts/ensure-chromium.sh").output().expect("bash runs");
    assert!(
        output.status.success(),
        "Chromium is needed for this test and could not be installed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// The page's DOM after its scripts ran, as Chromium serializes it.
fn rendered_dom(browser: &str, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=8000", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium runs");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut dom).map(|_| dom)
    });
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish rendering the page within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.wait().unwrap().success(), "chromium failed");
    reader.join().unwrap().expect("chromium's output")
}

/// The values of `attributes` on every `<tr>` that has the first of them, in page order.
fn rows(dom: &str, attributes: &[&str]) -> Vec<Vec<u64>> {
    dom.split("<tr ")
        .skip(1)
        .filter_map(|tag| {
            let tag = &tag[..tag.find('>')?];
            attributes
                .iter()
                .map(|name| {
                    let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
                    tag[start..].split('"').next()?.parse().ok()
                })
                .collect::<Option<Vec<u64>>>()
        })
        .collect()
}

#[test]
fn the_page_shows_the_apis_numbers() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 30_000, partitions: 3, minutes: 40, ads: 500, seed: 3, ..GenConfig::default() }, &logs).unwrap();
    let served = serve_replay(&logs, &dir.path().join("out"), &["--windows", "5m,60m"]);
    let a = served.address.as_str();

    // Defaults: the first configured window, every country.
    let dom = rendered_dom(&browser, &format!("http://{a}/"));
    let top = get_json(a, "/v1/ads/popular_ads?window=5m&count=100");
    let want: Vec<Vec<u64>> = top["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ad| vec![ad["rank"].as_u64().unwrap(), ad["ad_id"].as_u64().unwrap(), ad["clicks"].as_u64().unwrap()])
        .collect();
    assert!(want.len() > 10, "the data set should fill the table");
    assert_eq!(rows(&dom, &["data-rank", "data-ad", "data-clicks"]), want, "the top table differs from the API");

    // The chart of the top ad: clicks per minute over the last 30 minutes.
    let best = want[0][1];
    let boundary = top["as_of_minute"].as_u64().unwrap();
    let series = rows(&dom, &["data-minute", "data-clicks"]);
    assert_eq!(series.len(), 30, "the chart should show 30 minutes");
    for row in &series {
        let (minute, clicks) = (row[0], row[1]);
        assert!(minute < boundary);
        let api = get_json(a, &format!("/v1/ads/{best}/aggregated_count?from={minute}&to={}", minute + 1));
        assert_eq!(api["clicks"].as_u64(), Some(clicks), "minute {minute} of ad {best}");
    }
    assert!(dom.contains(&format!("<b id=\"watermark\">{}</b>", top["watermark"])), "the watermark shown differs");
}
