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
    /// Check a model on this device, loading it exactly as the agent does.
    #[command(subcommand)]
    Model(ModelCmd),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Run a model over the rows of a CSV file (header row: input feature names, in order).
    Run {
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
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
        Cmd::Model(ModelCmd::Run { model, input, json }) => model_run(&model, &input, json),
        Cmd::Model(ModelCmd::Inspect { model, json }) => model_inspect(&model, json),
    };
    ExitCode::from(code as u8)
}

fn run(config: PathBuf) -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LATHE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lathe: {e:#}");
            return exit::CONFIG;
        }
    };
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
            if e.downcast_ref::<ConfigError>().is_some() {
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

fn status(config: PathBuf, state_dir: Option<PathBuf>, json: bool) -> i32 {
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
            eprintln!("lathe: {e:#}");
            return exit::CONFIG;
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
        Err(e) => {
            eprintln!("lathe: {e}");
            exit::PROBLEM
        }
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn model_run(model: &std::path::Path, input: &std::path::Path, json: bool) -> i32 {
    let run = || -> Result<(), String> {
        let onnx = read(model)?;
        let text = String::from_utf8(read(input)?).map_err(|_| format!("{}: not UTF-8 text", input.display()))?;
        let (header, rows) = lathe::engine::parse_csv(&text).map_err(|e| format!("{}: {e}", input.display()))?;
        let engine =
            lathe::engine::Engine::load(&onnx, header.len()).map_err(|e| format!("{}: {e}", model.display()))?;
        let outputs = engine.run(&rows).map_err(|e| format!("{}: {e}", model.display()))?;
        for i in 0..outputs.rows() {
            let o = outputs.row(i);
            if json {
                println!("{}", serde_json::to_string(&o).expect("outputs serialize"));
            } else {
                let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                println!("row {i}: {}", parts.join(" "));
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => exit::OK,
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
    if json {
        println!("{}", serde_json::to_string_pretty(&info).expect("info serializes"));
    } else {
        for (kind, list) in [("input", &info.inputs), ("output", &info.outputs)] {
            for t in list {
                println!("{kind:<10} {} {} [{}]", t.name, t.dtype, t.shape.join(", "));
            }
        }
        for (op, n) in &info.operators {
            println!("operator   {op} x{n}");
        }
        for u in &info.unsupported {
            println!("UNSUPPORTED {u}");
        }
    }
    if info.unsupported.is_empty() {
        exit::OK
    } else {
        exit::PROBLEM
    }
}
