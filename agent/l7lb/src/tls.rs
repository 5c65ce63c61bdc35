//! HTTPS: one acceptor per listener (BoringSSL), its certificate chosen by
//! the name the client asks for (SNI): an exact name of a certificate's,
//! then a wildcard one (`*.example.org` covers one label), else the first
//! certificate. ALPN offers h2 and http/1.1.

use boring::ssl::{select_next_proto, AlpnError, NameType, SslAcceptor, SslContext, SslFiletype, SslMethod};
use boring::x509::X509;

use crate::config::Certificate;

/// A certificate loaded, with the names it covers.
struct Loaded {
    names: Vec<String>,
    context: SslContext,
}

/// The names a certificate covers: its DNS subject alternative names, or
/// its common name when it has none (lower case).
fn names_of(cert: &X509) -> Vec<String> {
    let mut out: Vec<String> = cert
        .subject_alt_names()
        .map(|s| {
            s.iter()
                .filter_map(|n| n.dnsname().map(str::to_ascii_lowercase))
                .collect()
        })
        .unwrap_or_default();
    if out.is_empty() {
        out = cert
            .subject_name()
            .entries_by_nid(boring::nid::Nid::COMMONNAME)
            .filter_map(|e| e.data().as_utf8().ok().map(|s| s.to_ascii_lowercase()))
            .collect();
    }
    out
}

fn context(c: &Certificate, at: &str) -> Result<Loaded, String> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| format!("{at}: TLS setup: {e}"))?;
    b.set_certificate_chain_file(&c.cert)
        .map_err(|e| format!("{at}.cert: {}: {e}", c.cert.display()))?;
    b.set_private_key_file(&c.key, SslFiletype::PEM)
        .map_err(|e| format!("{at}.key: {}: {e}", c.key.display()))?;
    b.check_private_key().map_err(|e| {
        format!(
            "{at}.key: {} is not the key of {}: {e}",
            c.key.display(),
            c.cert.display()
        )
    })?;
    b.set_alpn_select_callback(|_, client| select_next_proto(b"\x02h2\x08http/1.1", client).ok_or(AlpnError::NOACK));
    let pem = std::fs::read(&c.cert).map_err(|e| format!("{at}.cert: {}: {e}", c.cert.display()))?;
    let cert = X509::from_pem(&pem).map_err(|e| format!("{at}.cert: {}: {e}", c.cert.display()))?;
    let names = names_of(&cert);
    if names.is_empty() {
        return Err(format!("{at}.cert: {} names no host", c.cert.display()));
    }
    Ok(Loaded {
        names,
        context: b.build().into_context(),
    })
}

/// Whether a certificate name covers `host`.
pub fn covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
        None => name == host,
    }
}

/// The names each of a listener's certificates covers, in order.
#[derive(Debug)]
pub struct Names(Vec<Vec<String>>);

impl Names {
    /// The certificate a client naming `sni` gets: one with that exact
    /// name, else one whose wildcard covers it, else the first.
    pub fn chosen(&self, sni: Option<&str>) -> usize {
        let Some(host) = sni.map(str::to_ascii_lowercase) else {
            return 0;
        };
        self.0
            .iter()
            .position(|n| n.contains(&host))
            .or_else(|| self.0.iter().position(|n| n.iter().any(|x| covers(x, &host))))
            .unwrap_or(0)
    }

    /// Whether certificate `i` covers `host`: a request on a connection
    /// must be for a name of the certificate the connection got.
    pub fn covers(&self, i: usize, host: &str) -> bool {
        self.0.get(i).is_some_and(|n| n.iter().any(|x| covers(x, host)))
    }
}

/// The listener's acceptor, from its certificates (`at`: the field, for
/// errors), and the names each covers.
pub fn acceptor(certs: &[Certificate], at: &str) -> Result<(SslAcceptor, Names), String> {
    let loaded: Vec<Loaded> = certs
        .iter()
        .enumerate()
        .map(|(i, c)| context(c, &format!("{at}.certificates[{i}]")))
        .collect::<Result<_, _>>()?;
    let names = Names(loaded.iter().map(|l| l.names.clone()).collect());
    let c0 = &certs[0];
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| format!("{at}: TLS setup: {e}"))?;
    b.set_certificate_chain_file(&c0.cert)
        .map_err(|e| format!("{at}.certificates[0].cert: {e}"))?;
    b.set_private_key_file(&c0.key, SslFiletype::PEM)
        .map_err(|e| format!("{at}.certificates[0].key: {e}"))?;
    b.set_alpn_select_callback(|_, client| select_next_proto(b"\x02h2\x08http/1.1", client).ok_or(AlpnError::NOACK));
    let pick = Names(names.0.clone());
    b.set_servername_callback(move |ssl, _alert| {
        let i = pick.chosen(ssl.servername(NameType::HOST_NAME));
        if i != 0 {
            // That certificate's context: its certificate, key and ALPN.
            let _ = ssl.set_ssl_context(&loaded[i].context);
        }
        Ok(())
    });
    Ok((b.build(), names))
}

#[cfg(test)]
mod tests {
    use super::{covers, Names};

    #[test]
    fn a_name_gets_its_certificate_exact_first() {
        let n = Names(vec![
            vec!["default.example".into()],
            vec!["*.a.example".into()],
            vec!["www.a.example".into()],
        ]);
        assert_eq!(n.chosen(Some("WWW.a.example")), 2);
        assert_eq!(n.chosen(Some("x.a.example")), 1);
        assert_eq!(n.chosen(Some("other.example")), 0);
        assert_eq!(n.chosen(None), 0);
        assert!(n.covers(1, "x.a.example") && !n.covers(1, "default.example"));
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(covers("a.example", "a.example"));
        assert!(covers("*.example", "a.example"));
        assert!(!covers("*.example", "a.b.example"));
        assert!(!covers("*.example", "example"));
        assert!(!covers("*.example", ".example"));
    }
}
