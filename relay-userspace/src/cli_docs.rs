//! Man pages and shell completions generated from the binaries' clap definitions, for the
//! package (`cargo xtask deb` runs `relayd --generate man`, `relayctl generate bash`, ...),
//! so they never drift from `--help`.

use std::io;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generated {
    /// The man page, in roff
    Man,
    Bash,
    Zsh,
    Fish,
}

/// Writes what was asked for `command` to stdout; `section` is the man page's (8 for the
/// daemon, 1 for the CLI).
pub fn generate(mut command: clap::Command, what: Generated, section: &str) -> io::Result<()> {
    let name = command.get_name().to_owned();
    let mut out = io::stdout().lock();
    let shell = match what {
        Generated::Man => {
            return clap_mangen::Man::new(command)
                .section(section)
                .render(&mut out);
        }
        Generated::Bash => clap_complete::Shell::Bash,
        Generated::Zsh => clap_complete::Shell::Zsh,
        Generated::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, name, &mut out);
    Ok(())
}
