//! A real browser for tests: Debian's `chromium`, driven through `chromedriver` over the W3C
//! WebDriver protocol (plain HTTP and JSON, so no client library is needed).
//!
//! `chromedriver` is taken from `CHROMEDRIVER_BIN`, else `/usr/bin/chromedriver`; the browser
//! from `CHROMIUM_BIN`, else `/usr/bin/chromium`. `scripts/setup.sh` installs both. The driver
//! process is killed on `Drop`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// The key WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One headless browser session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

/// A decoded screenshot: RGBA pixels.
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

impl Picture {
    fn decode(png_bytes: &[u8]) -> Picture {
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().expect("a PNG screenshot");
        let mut buffer = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buffer).expect("a PNG frame");
        let channels = info.color_type.samples();
        let rgba = buffer[..info.buffer_size()]
            .chunks(channels)
            .flat_map(|pixel| match channels {
                4 => [pixel[0], pixel[1], pixel[2], pixel[3]],
                3 => [pixel[0], pixel[1], pixel[2], 255],
                _ => [pixel[0], pixel[0], pixel[0], 255],
            })
            .collect();
        Picture {
            width: info.width,
            height: info.height,
            rgba,
        }
    }

    /// The share of pixels that are neither white nor near-white (the background).
    pub fn inked_share(&self) -> f64 {
        let inked = self
            .rgba
            .chunks(4)
            .filter(|p| p[0] < 235 || p[1] < 235 || p[2] < 235)
            .count();
        inked as f64 / (self.width as f64 * self.height as f64)
    }

    /// How many distinct strong colours (saturated, not grey) appear in at least `min_pixels`
    /// pixels: the series of a chart, each drawn in its colour.
    pub fn strong_colours(&self, min_pixels: usize) -> usize {
        let mut counts = std::collections::HashMap::new();
        for p in self.rgba.chunks(4) {
            let (max, min) = (p[0].max(p[1]).max(p[2]), p[0].min(p[1]).min(p[2]));
            if max - min > 60 {
                // quantised, so anti-aliased edges of one colour count as that colour
                *counts
                    .entry((p[0] / 32, p[1] / 32, p[2] / 32))
                    .or_insert(0usize) += 1;
            }
        }
        counts
            .values()
            .filter(|count| **count >= min_pixels)
            .count()
    }
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless chromium of `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let driver_bin =
            std::env::var("CHROMEDRIVER_BIN").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium_bin =
            std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let port = crate::free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start {driver_bin} ({error}): scripts/setup.sh installs chromium-driver")
            });
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(response) = ready {
                let status: Value = response.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let user_data = std::env::temp_dir().join(format!("kpi-chromium-{port}"));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium_bin,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--hide-scrollbars", "--force-device-scale-factor=1",
                         format!("--window-size={width},{height}"),
                         format!("--user-data-dir={}", user_data.display())]
            },
            "goog:loggingPrefs": {"browser": "ALL"}
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a JSON session");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
            http,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{}", self.base, self.session, path);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a JSON answer");
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    /// Opens `url` and waits for the page to load.
    pub async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The address of the page shown.
    pub async fn url(&self) -> String {
        self.command(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub async fn run(&self, script: &str, args: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// The reference of the first element matching `css`.
    pub async fn find(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .or_else(|| found["ELEMENT"].as_str())
            .unwrap_or_else(|| panic!("no element reference for {css}: {found}"))
            .to_string()
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Presses keys (WebDriver key codes, e.g. "\u{E004}" for Tab) on the focused element.
    pub async fn press(&self, keys: &[&str]) {
        let actions: Vec<Value> = keys
            .iter()
            .flat_map(|key| {
                [
                    json!({"type": "keyDown", "value": key}),
                    json!({"type": "keyUp", "value": key}),
                ]
            })
            .collect();
        self.command(
            reqwest::Method::POST,
            "/actions",
            Some(json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        )
        .await;
    }

    /// A screenshot of the element matching `css`.
    pub async fn screenshot_of(&self, css: &str) -> (Vec<u8>, Picture) {
        let element = self.find(css).await;
        self.screenshot_at(&format!("/element/{element}/screenshot"))
            .await
    }

    /// A screenshot of the window.
    pub async fn screenshot(&self) -> (Vec<u8>, Picture) {
        self.screenshot_at("/screenshot").await
    }

    /// The PNG a screenshot command answers, and its pixels.
    async fn screenshot_at(&self, path: &str) -> (Vec<u8>, Picture) {
        let encoded = self.command(reqwest::Method::GET, path, None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        let picture = Picture::decode(&bytes);
        (bytes, picture)
    }

    /// The browser's console messages since the last call (level and text).
    pub async fn console(&self) -> Vec<(String, String)> {
        let entries = self
            .command(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        entries
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| {
                (
                    entry["level"].as_str().unwrap_or_default().to_string(),
                    entry["message"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Resizes the window.
    pub async fn resize(&self, width: u32, height: u32) {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session ends chromium; killing the driver is the backstop.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    runtime.block_on(async {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            reqwest::Client::new().delete(&url).send(),
                        )
                        .await;
                    });
                    Some(())
                })
                .join()
        });
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
