//! nmap's greppable output (`-oG -`), read one way by every test that
//! scans.

/// One host's result line.
#[derive(Debug)]
pub struct Scan {
    /// (port, protocol, state) of every port nmap listed.
    pub ports: Vec<(u16, String, String)>,
    /// The state nmap left out as the common one, and how many ports had
    /// it (`Ignored State: filtered (65534)`), if it did.
    pub ignored: Option<(String, usize)>,
    /// The line itself, for messages.
    pub line: String,
}

/// The result line of `out`; panics, showing the output, without one.
pub fn parse(out: &str) -> Scan {
    let line = out
        .lines()
        .find(|l| l.contains("Ports:") || l.contains("Ignored State:"))
        .unwrap_or_else(|| panic!("no port results in nmap output:\n{out}"));
    let mut ports = Vec::new();
    if let Some((_, listed)) = line.split_once("Ports: ") {
        let listed = listed.split("\tIgnored").next().unwrap_or("");
        for entry in listed.split(", ") {
            let fields: Vec<&str> = entry.split('/').collect();
            ports.push((
                fields[0].trim().parse().unwrap(),
                fields[2].to_owned(),
                fields[1].to_owned(),
            ));
        }
    }
    let ignored = line.split_once("Ignored State: ").map(|(_, rest)| {
        let (state, count) = rest.trim().split_once(" (").unwrap();
        (
            state.to_owned(),
            count.trim_end_matches(')').parse().unwrap(),
        )
    });
    Scan {
        ports,
        ignored,
        line: line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_and_ignored_ports_are_read() {
        let scan = parse(
            "# Nmap 7.93 scan\nHost: 198.18.0.1 ()\tStatus: Up\n\
             Host: 198.18.0.1 ()\tPorts: 443/open/tcp//https///, 9999/closed/udp//distinct///\t\
             Ignored State: filtered (65534)\n",
        );
        assert_eq!(
            scan.ports,
            [
                (443, "tcp".to_owned(), "open".to_owned()),
                (9999, "udp".to_owned(), "closed".to_owned())
            ]
        );
        assert_eq!(scan.ignored, Some(("filtered".to_owned(), 65534)));
    }
}
