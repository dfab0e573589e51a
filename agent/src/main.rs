use clap::{Parser, Subcommand};
use lathe::config::{Config, ConfigError};
use lathe::exit;
use std::path::PathBuf;
use std::process::ExitCode;

/// Lathe edge agent: runs signed ONNX model bundles at the machine.
#[derive(Parser)]
#[command(name = "lathe", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        #[arg(long, short, default_value = "/etc/lathe/lathe.toml")]
        config: PathBuf,
    },
    /// Show the connection, the active model, the outbox and the last sync. Works offline.
    Status {
        #[arg(long, short, default_value = "/etc/lathe/lathe.toml")]
        config: PathBuf,
        /// Read this state directory instead of the one the config names.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Check the set-up and say what to fix: the config, secrets, the state_dir and its disk,
    /// the trust store, the brokers (reachability, TLS, credentials), certificate expiry, the
    /// clock, and that each active model loads and passes its self-test. Exit codes: 0 no
    /// check failed (warnings allowed), 1 a check failed, 2 usage, 78 the config is invalid.
    Doctor {
        #[arg(long, short, default_value = "/etc/lathe/lathe.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// How long a broker may take to accept a connection, in seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
        timeout_secs: u64,
        /// Warn about a certificate this many days before it expires.
        #[arg(long, default_value_t = 30)]
        cert_warn_days: u64,
    },
    /// Check a model on this device, loading it exactly as the agent does.
    #[command(subcommand)]
    Model(ModelCmd),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Run a model over the rows of a CSV file, or over `.npy` tensors, exactly as the agent
    /// would.
    ///
    /// MODEL is an ONNX file or a signed bundle (`.lbundle`). A bundle is verified with the
    /// trust store of `--config` and loaded as a deploy loads it; its manifest names the
    /// features or describes the input tensors. A CSV's header row names the columns, which are
    /// matched to the features by name; every cell must be a finite number. A tensor model takes
    /// one float32 `.npy` file per input, in the model's input order, each of shape
    /// `[samples, …]`.
    Run {
        model: PathBuf,
        /// A CSV file, or one `.npy` file per model input (repeat --input).
        #[arg(long, required = true)]
        input: Vec<PathBuf>,
        /// The model's features, in its input order, comma-separated (ONNX files only; without
        /// it the CSV's columns are taken in header order).
        #[arg(long, value_delimiter = ',')]
        features: Option<Vec<String>>,
        /// The agent config whose trust store verifies a bundle.
        #[arg(long, short, default_value = "/etc/lathe/lathe.toml")]
        config: PathBuf,
        /// One JSON object per row (the default prints one readable line per row).
        #[arg(long)]
        json: bool,
    },
    /// List a model's inputs, outputs and operators, and what this engine cannot run.
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE as u8
            } else {
                exit::OK as u8
            });
        }
    };
    let code = match cli.cmd {
        Cmd::Run { config } => run(config),
        Cmd::Status {
            config,
            state_dir,
            json,
        } => status(config, state_dir, json),
        Cmd::Doctor {
            config,
            json,
            timeout_secs,
            cert_warn_days,
        } => doctor(&config, json, timeout_secs, cert_warn_days),
        Cmd::Model(ModelCmd::Run {
            model,
            input,
            features,
            config,
            json,
        }) => model_run(&model, &input, features, &config, json),
        Cmd::Model(ModelCmd::Inspect { model, json }) => model_inspect(&model, json),
    };
    ExitCode::from(code as u8)
}

fn run(config: PathBuf) -> i32 {
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lathe: {e:#}");
            return exit::CONFIG;
        }
    };
    lathe::logs::init(cfg.log.format, "info");
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lathe: cannot start the runtime: {e}");
            return exit::PROBLEM;
        }
    };
    let result = rt.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            sd.cancel();
        });
        lathe::agent::run(cfg, shutdown).await
    });
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("lathe: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<lathe::agent::StartError>().is_some() {
                exit::CONFIG
            } else {
                exit::PROBLEM
            }
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn doctor(config: &std::path::Path, json: bool, timeout_secs: u64, cert_warn_days: u64) -> i32 {
    let opts = lathe::doctor::Options {
        connect_timeout: std::time::Duration::from_secs(timeout_secs),
        cert_warn_days,
    };
    let r = lathe::doctor::run(config, &opts);
    if json {
        println!("{}", serde_json::to_string_pretty(&r).expect("a report serializes"));
    } else {
        print!("{}", lathe::doctor::render(&r));
    }
    match (r.ok, r.config_failed()) {
        (true, _) => exit::OK,
        (false, true) => exit::CONFIG,
        (false, false) => exit::PROBLEM,
    }
}

fn status(config: PathBuf, state_dir: Option<PathBuf>, json: bool) -> i32 {
    // With --json, one JSON object is printed whatever happens, errors included.
    let fail = |message: String, hint: &str, code: i32| {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&lathe::status::failure(&message, hint)).expect("json")
            );
        } else {
            eprintln!("lathe: {message}; {hint}");
        }
        code
    };
    // Thresholds come from the config when it loads; `--state-dir` works without one.
    let loaded = Config::load(&config);
    let thresholds = |c: &Config| lathe::status::Thresholds {
        status: c.status.clone(),
        min_free_bytes: c.outbox.min_free_bytes,
    };
    let (dir, t) = match (state_dir, loaded) {
        (Some(d), Ok(c)) => (d, thresholds(&c)),
        (Some(d), Err(_)) => (d, lathe::status::Thresholds::default()),
        (None, Ok(c)) => (c.device.state_dir.clone(), thresholds(&c)),
        (None, Err(e)) => {
            return fail(
                format!("{e:#}"),
                "fix the config, or read a state directory directly with --state-dir",
                exit::CONFIG,
            )
        }
    };
    match lathe::status::report(&dir, &t) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).expect("report serializes"));
            } else {
                print!("{}", lathe::status::render(&r));
            }
            if r.problems.is_empty() {
                exit::OK
            } else {
                exit::PROBLEM
            }
        }
        Err(e) => fail(e.message, e.hint, exit::PROBLEM),
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Write to stdout; a reader that went away (`| head`) ends the command quietly.
struct Out(std::io::StdoutLock<'static>);

impl Out {
    fn new() -> Out {
        Out(std::io::stdout().lock())
    }

    fn line(&mut self, text: std::fmt::Arguments<'_>) -> Result<(), String> {
        use std::io::Write;
        match writeln!(self.0, "{text}") {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(String::new()),
            Err(e) => Err(format!("stdout: {e}")),
        }
    }
}

/// A bundle verified with the trust store of `config` and loaded as a deploy loads it.
fn bundle_for_run(
    path: &std::path::Path,
    bytes: &[u8],
    config: &std::path::Path,
) -> Result<lathe::deploy::ActiveModel, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let cfg = Config::load(config).map_err(|e| {
        at(&format_args!(
            "a bundle is verified with the device's trust store: {e:#}; pass --config"
        ))
    })?;
    let trust = lathe::agent::load_trust(&cfg).map_err(|e| at(&format_args!("{e:#}")))?;
    let policy = protocol::bundle::Policy {
        trust: &trust.store,
        threshold: trust.threshold,
        now: lathe::sync::now_ms() / 1000,
        installed_version: &protocol::bundle::none_installed,
    };
    let verified = protocol::bundle::verify(bytes, &policy).map_err(|e| at(&e))?;
    lathe::deploy::load_model(verified).map_err(|e| at(&e))
}

/// What `model run` runs on a CSV: the engine, the features in its input order, and whether
/// the model takes missing values.
fn model_for_csv(
    path: &std::path::Path,
    csv: &str,
    features: Option<Vec<String>>,
    config: &std::path::Path,
) -> Result<(lathe::engine::Engine, Vec<String>, bool), String> {
    let bytes = read(path)?;
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    if bytes.starts_with(protocol::bundle::MAGIC) {
        if features.is_some() {
            return Err(at(
                &"a bundle's manifest names its features; --features is for ONNX files",
            ));
        }
        let model = bundle_for_run(path, &bytes, config)?;
        let Some(input) = model.manifest.features() else {
            return Err(at(&"this bundle's model takes tensors: give one .npy file per input"));
        };
        let (features, missing) = (input.features.clone(), input.accepts_missing);
        return Ok((model.engine, features, missing));
    }
    let features = match features {
        Some(f) => f,
        None => lathe::engine::csv_header(csv)?,
    };
    let engine = lathe::engine::Engine::load(&bytes, features.len()).map_err(|e| at(&e))?;
    // What `bundle pack` would sign into the manifest for this model.
    let missing = engine.handles_missing();
    Ok((engine, features, missing))
}

/// `model run` on `.npy` tensors: the engine for their shapes, and the rows (every input's
/// values of one sample, back to back).
fn model_for_npy(
    path: &std::path::Path,
    inputs: &[PathBuf],
    config: &std::path::Path,
) -> Result<(lathe::engine::Engine, Vec<Vec<f32>>), String> {
    let tensors = lathe::npy::read_files(inputs)?;
    let (shapes, rows) = lathe::npy::rows(&tensors).map_err(|e| format!("--input: {e} (in --input order)"))?;
    let bytes = read(path)?;
    let engine = if bytes.starts_with(protocol::bundle::MAGIC) {
        let engine = bundle_for_run(path, &bytes, config)?.engine;
        let want: Vec<Vec<usize>> = engine.inputs().iter().map(|i| i.shape.clone()).collect();
        if want != shapes {
            let describe = |s: &[Vec<usize>]| {
                s.iter()
                    .map(|d| {
                        format!(
                            "[N, {}]",
                            d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" and ")
            };
            return Err(format!(
                "the input files hold {}; the bundle's model takes {}",
                describe(&shapes),
                describe(&want)
            ));
        }
        engine
    } else {
        lathe::engine::Engine::load_shapes(&bytes, &shapes).map_err(|e| format!("{}: {e}", path.display()))?
    };
    Ok((engine, rows))
}

fn model_run(
    model: &std::path::Path,
    inputs: &[PathBuf],
    features: Option<Vec<String>>,
    config: &std::path::Path,
    json: bool,
) -> i32 {
    let run = || -> Result<(), String> {
        let npy = |p: &PathBuf| lathe::npy::is_npy(p);
        let (engine, rows) = if inputs.iter().any(npy) {
            if !inputs.iter().all(npy) {
                return Err("give one CSV file, or one .npy file per model input".into());
            }
            if features.is_some() {
                return Err("--features names the columns of a CSV file; .npy inputs have none".into());
            }
            model_for_npy(model, inputs, config)?
        } else {
            let [input] = inputs else {
                return Err("give one CSV file, or one .npy file per model input".into());
            };
            let text = String::from_utf8(read(input)?).map_err(|_| format!("{}: not UTF-8 text", input.display()))?;
            let (engine, features, missing) = model_for_csv(model, &text, features, config)?;
            let rows =
                lathe::engine::parse_csv(&text, &features, missing).map_err(|e| format!("{}: {e}", input.display()))?;
            (engine, rows)
        };
        let outputs = engine.run(&rows).map_err(|e| format!("{}: {e}", model.display()))?;
        let mut out = Out::new();
        for i in 0..outputs.rows() {
            let o = outputs.row(i);
            if json {
                out.line(format_args!(
                    "{}",
                    serde_json::to_string(&o).expect("outputs serialize")
                ))?;
            } else {
                let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                out.line(format_args!("row {i}: {}", parts.join(" ")))?;
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => exit::OK,
        Err(e) if e.is_empty() => exit::OK,
        Err(e) => {
            eprintln!("lathe: {e}");
            exit::PROBLEM
        }
    }
}

fn model_inspect(model: &std::path::Path, json: bool) -> i32 {
    let info =
        match read(model).and_then(|b| lathe::engine::inspect(&b).map_err(|e| format!("{}: {e}", model.display()))) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("lathe: {e}");
                return exit::PROBLEM;
            }
        };
    let mut out = Out::new();
    let printed = (|| -> Result<(), String> {
        if json {
            return out.line(format_args!(
                "{}",
                serde_json::to_string_pretty(&info).expect("info serializes")
            ));
        }
        for (kind, list) in [("input", &info.inputs), ("output", &info.outputs)] {
            for t in list {
                out.line(format_args!(
                    "{kind:<10} {} {} [{}]",
                    t.name,
                    t.dtype,
                    t.shape.join(", ")
                ))?;
            }
        }
        out.line(format_args!("opset      {}", info.opset))?;
        for (op, n) in &info.operators {
            out.line(format_args!("operator   {op} x{n}"))?;
        }
        for p in &info.problems {
            out.line(format_args!("CANNOT RUN {p}"))?;
        }
        if info.problems.is_empty() {
            if info.trial_run {
                out.line(format_args!("ok         loads and runs on trial rows"))?;
            } else {
                out.line(format_args!(
                    "ok         no problem declared; an input's dimensions are not all declared, so the trial run happens at pack time"
                ))?;
            }
        }
        Ok(())
    })();
    match printed {
        Err(e) if !e.is_empty() => {
            eprintln!("lathe: {e}");
            exit::PROBLEM
        }
        _ if info.problems.is_empty() => exit::OK,
        _ => exit::PROBLEM,
    }
}
