//! The certificate service's SOAP messages: building the three requests in the schema's element
//! order, and reading the answers (with roxmltree) after their signature has been checked.

use base64::Engine;
use roxmltree::{Document, Node};

use crate::vero_ca::Environment;

/// The namespace of the request and response elements (their children carry none).
pub const NS: &str = "http://certificates.vero.fi/2017/10/certificateservices";
/// SOAP 1.1 envelope namespace.
pub const SOAP_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";

/// One of the service's three operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// First certificate with transfer IDs.
    SignNew,
    /// Fetch an issued certificate by retrieval ID.
    Get,
    /// New certificate, request signed with the current one.
    Renew,
}

impl Operation {
    /// The `SOAPAction` header value.
    pub fn soap_action(self) -> &'static str {
        match self {
            Operation::SignNew => "signNewCertificate",
            Operation::Get => "getCertificate",
            Operation::Renew => "renewCertificate",
        }
    }

    /// The request element's local name.
    pub fn request_element(self) -> &'static str {
        match self {
            Operation::SignNew => "SignNewCertificateRequest",
            Operation::Get => "GetCertificateRequest",
            Operation::Renew => "RenewCertificateRequest",
        }
    }

    /// The response element's local name.
    pub fn response_element(self) -> &'static str {
        match self {
            Operation::SignNew => "SignNewCertificateResponse",
            Operation::Get => "GetCertificateResponse",
            Operation::Renew => "RenewCertificateResponse",
        }
    }

    /// The operation a request element names, if any.
    pub fn from_request_element(name: &str) -> Option<Operation> {
        [Operation::SignNew, Operation::Get, Operation::Renew]
            .into_iter()
            .find(|o| o.request_element() == name)
    }
}

/// A value the schema would refuse, named by the flag it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} is {len} characters long; the certificate service accepts at most {max}")]
pub struct FieldError {
    /// The flag (or field) the value came from.
    pub flag: &'static str,
    /// Its length in characters.
    pub len: usize,
    /// The schema's limit.
    pub max: usize,
}

/// Checks a value against a schema length limit, and that it is not empty.
pub fn check_len(flag: &'static str, value: &str, max: usize) -> Result<(), FieldError> {
    let len = value.chars().count();
    if len > max || len == 0 {
        return Err(FieldError { flag, len, max });
    }
    Ok(())
}

/// Whose certificate it is: the fields every request starts with.
#[derive(Debug, Clone)]
pub struct Customer {
    /// `TEST` or `PRODUCTION`.
    pub environment: Environment,
    /// The organisation's business ID (`CustomerId`, at most 30 characters).
    pub customer_id: String,
    /// The organisation's name (`CustomerName`, optional, at most 100 characters).
    pub customer_name: Option<String>,
}

impl Customer {
    /// Checks the lengths the schema sets.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_len("--customer-id", &self.customer_id, 30)?;
        if let Some(n) = &self.customer_name {
            check_len("--customer-name", n, 100)?;
        }
        Ok(())
    }

    fn write(&self, out: &mut String) {
        leaf(out, "Environment", self.environment.service_value());
        leaf(out, "CustomerId", &self.customer_id);
        if let Some(n) = &self.customer_name {
            leaf(out, "CustomerName", n);
        }
    }
}

/// Escapes text content.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\r' => o.push_str("&#xD;"),
            c => o.push(c),
        }
    }
    o
}

fn leaf(out: &mut String, name: &str, text: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    out.push_str(&escape(text));
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

fn element(op: Operation, children: &str) -> String {
    let name = op.request_element();
    format!(r#"<cs:{name} xmlns:cs="{NS}">{children}</cs:{name}>"#)
}

fn b64(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// `SignNewCertificateRequest`: the request element, not yet in an envelope.
pub fn sign_new_request(
    customer: &Customer,
    transfer_id: &str,
    transfer_password: &str,
    csr_der: &[u8],
) -> Result<String, FieldError> {
    customer.validate()?;
    check_len("--transfer-id", transfer_id, 32)?;
    check_len("the transfer password", transfer_password, 16)?;
    let mut c = String::new();
    customer.write(&mut c);
    leaf(&mut c, "TransferId", transfer_id);
    leaf(&mut c, "TransferPassword", transfer_password);
    leaf(&mut c, "CertificateRequest", &b64(csr_der));
    Ok(element(Operation::SignNew, &c))
}

/// `GetCertificateRequest`: the request element.
pub fn get_request(customer: &Customer, retrieval_id: &str) -> Result<String, FieldError> {
    customer.validate()?;
    check_len("--retrieval-id", retrieval_id, 32)?;
    let mut c = String::new();
    customer.write(&mut c);
    leaf(&mut c, "RetrievalId", retrieval_id);
    Ok(element(Operation::Get, &c))
}

/// `RenewCertificateRequest` without its signature (see [`super::dsig::sign_enveloped`]).
pub fn renew_request_unsigned(customer: &Customer, csr_der: &[u8]) -> Result<String, FieldError> {
    customer.validate()?;
    let mut c = String::new();
    customer.write(&mut c);
    leaf(&mut c, "CertificateRequest", &b64(csr_der));
    Ok(element(Operation::Renew, &c))
}

/// Puts a request or response element into a SOAP 1.1 envelope.
pub fn envelope(body_element: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="{SOAP_NS}"><soapenv:Header/><soapenv:Body>{body_element}</soapenv:Body></soapenv:Envelope>"#
    )
}

/// A SOAP 1.1 fault.
pub fn fault(code: &str, message: &str) -> String {
    envelope(&format!(
        "<soapenv:Fault><faultcode>soapenv:{}</faultcode><faultstring>{}</faultstring></soapenv:Fault>",
        escape(code),
        escape(message)
    ))
}

/// One `ErrorInfo` of a `Result`: shown to the user as the service wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// `ErrorCode`.
    pub code: String,
    /// `ErrorMessage`.
    pub message: String,
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// `Result`: `Status` plus any `ErrorInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceResult {
    /// `Status` was `OK`.
    pub ok: bool,
    /// The `Status` text as sent.
    pub status: String,
    /// The `ErrorInfo` entries, in order.
    pub errors: Vec<ErrorInfo>,
}

impl std::fmt::Display for ServiceResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Status {}", self.status)?;
        for e in &self.errors {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

/// What a response element says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `RetrievalId` (SignNew and Renew answers).
    pub retrieval_id: Option<String>,
    /// `Certificate`, decoded from base64 (Get answers).
    pub certificate: Option<Vec<u8>>,
    /// `Result`.
    pub result: ServiceResult,
}

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not XML.
    #[error("the answer is not XML: {0}")]
    NotXml(String),
    /// A SOAP fault instead of an answer.
    #[error("the certificate service answered with a SOAP fault: {code}: {message}")]
    Fault {
        /// `faultcode`.
        code: String,
        /// `faultstring`.
        message: String,
    },
    /// Not the shape the schema gives.
    #[error("the answer does not have the expected shape: {0}")]
    Shape(String),
}

/// Finds the single element in the SOAP body, or reads a fault.
pub fn body_element<'a, 'i>(doc: &'a Document<'i>) -> Result<Node<'a, 'i>, ParseError> {
    let env = doc.root_element();
    if !(env.tag_name().namespace() == Some(SOAP_NS) && env.tag_name().name() == "Envelope") {
        return Err(ParseError::Shape("no SOAP 1.1 Envelope".into()));
    }
    let body = child_elements(env)
        .find(|n| n.tag_name().namespace() == Some(SOAP_NS) && n.tag_name().name() == "Body")
        .ok_or_else(|| ParseError::Shape("no SOAP Body".into()))?;
    let mut items = child_elements(body);
    let first = items
        .next()
        .ok_or_else(|| ParseError::Shape("empty SOAP Body".into()))?;
    if items.next().is_some() {
        return Err(ParseError::Shape(
            "more than one element in the SOAP Body".into(),
        ));
    }
    if first.tag_name().namespace() == Some(SOAP_NS) && first.tag_name().name() == "Fault" {
        let text = |name: &str| {
            child_elements(first)
                .find(|n| n.tag_name().name() == name)
                .and_then(|n| n.text())
                .unwrap_or("")
                .trim()
                .to_string()
        };
        return Err(ParseError::Fault {
            code: text("faultcode"),
            message: text("faultstring"),
        });
    }
    Ok(first)
}

/// The element children of a node.
pub fn child_elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(|c| c.is_element())
}

/// The text of an element without element children (empty when it has none).
pub fn text_of(n: Node<'_, '_>) -> Result<String, ParseError> {
    if child_elements(n).next().is_some() {
        return Err(ParseError::Shape(format!(
            "{} holds elements, not text",
            n.tag_name().name()
        )));
    }
    // Text nodes only: roxmltree's text() also returns a comment's content, and comments are
    // not signed (exclusive c14n without comments drops them), so reading one would let an
    // unsigned comment change a signed value.
    Ok(n.children()
        .filter(|c| c.is_text())
        .filter_map(|c| c.text())
        .collect::<String>())
}

/// Reads a response element of `op` (whose signature the caller has already verified).
pub fn read_answer(el: Node<'_, '_>, op: Operation) -> Result<Answer, ParseError> {
    if el.tag_name().namespace() != Some(NS) || el.tag_name().name() != op.response_element() {
        return Err(ParseError::Shape(format!(
            "expected {{{NS}}}{}, got {{{}}}{}",
            op.response_element(),
            el.tag_name().namespace().unwrap_or(""),
            el.tag_name().name()
        )));
    }
    let mut answer = Answer {
        retrieval_id: None,
        certificate: None,
        result: ServiceResult {
            ok: false,
            status: String::new(),
            errors: Vec::new(),
        },
    };
    let mut saw_result = false;
    for c in child_elements(el) {
        if c.tag_name().namespace() == Some(super::dsig::DS_NS) {
            continue;
        }
        match c.tag_name().name() {
            "RetrievalId" if op != Operation::Get => {
                answer.retrieval_id = Some(text_of(c)?.trim().to_string())
            }
            "Certificate" if op == Operation::Get => {
                let t: String = text_of(c)?
                    .chars()
                    .filter(|c| !c.is_ascii_whitespace())
                    .collect();
                let der = base64::engine::general_purpose::STANDARD
                    .decode(t.as_bytes())
                    .map_err(|e| ParseError::Shape(format!("Certificate is not base64: {e}")))?;
                answer.certificate = Some(der);
            }
            "Result" => {
                saw_result = true;
                answer.result = read_result(c)?;
            }
            other => {
                return Err(ParseError::Shape(format!(
                    "unexpected element {other} in {}",
                    op.response_element()
                )))
            }
        }
    }
    if !saw_result {
        return Err(ParseError::Shape(format!(
            "{} has no Result",
            op.response_element()
        )));
    }
    Ok(answer)
}

fn read_result(r: Node<'_, '_>) -> Result<ServiceResult, ParseError> {
    let mut status = None;
    let mut errors = Vec::new();
    for c in child_elements(r) {
        match c.tag_name().name() {
            "Status" => status = Some(text_of(c)?.trim().to_string()),
            "ErrorInfo" => {
                let mut code = String::new();
                let mut message = String::new();
                for f in child_elements(c) {
                    match f.tag_name().name() {
                        "ErrorCode" => code = text_of(f)?.trim().to_string(),
                        "ErrorMessage" => message = text_of(f)?.trim().to_string(),
                        _ => {}
                    }
                }
                errors.push(ErrorInfo { code, message });
            }
            other => {
                return Err(ParseError::Shape(format!(
                    "unexpected element {other} in Result"
                )))
            }
        }
    }
    let status = status.ok_or_else(|| ParseError::Shape("Result has no Status".into()))?;
    Ok(ServiceResult {
        ok: status == "OK",
        status,
        errors,
    })
}

/// Builds a response element (for the stand-in), without its signature.
pub fn response_unsigned(
    op: Operation,
    retrieval_id: Option<&str>,
    certificate: Option<&[u8]>,
    errors: &[ErrorInfo],
) -> String {
    let mut c = String::new();
    if let Some(id) = retrieval_id {
        leaf(&mut c, "RetrievalId", id);
    }
    if let Some(der) = certificate {
        leaf(&mut c, "Certificate", &b64(der));
    }
    c.push_str("<Result>");
    leaf(
        &mut c,
        "Status",
        if errors.is_empty() { "OK" } else { "FAIL" },
    );
    for e in errors {
        c.push_str("<ErrorInfo>");
        leaf(&mut c, "ErrorCode", &e.code);
        leaf(&mut c, "ErrorMessage", &e.message);
        c.push_str("</ErrorInfo>");
    }
    c.push_str("</Result>");
    let name = op.response_element();
    format!(r#"<cs:{name} xmlns:cs="{NS}">{c}</cs:{name}>"#)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn customer(name: Option<&str>) -> Customer {
        Customer {
            environment: Environment::Test,
            customer_id: "0245437-2".into(),
            customer_name: name.map(str::to_string),
        }
    }

    fn children(xml: &str) -> Vec<(Option<String>, String)> {
        let doc = Document::parse(xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().namespace(), Some(NS));
        child_elements(root)
            .map(|c| {
                (
                    c.tag_name().namespace().map(str::to_string),
                    c.tag_name().name().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn sign_new_children_in_schema_order_without_namespace() {
        let xml = sign_new_request(&customer(Some("A & B <Oy>")), "T1", "pw", b"csr").unwrap();
        let names: Vec<_> = children(&xml)
            .into_iter()
            .map(|(ns, n)| {
                assert_eq!(ns, None);
                n
            })
            .collect();
        assert_eq!(
            names,
            [
                "Environment",
                "CustomerId",
                "CustomerName",
                "TransferId",
                "TransferPassword",
                "CertificateRequest"
            ]
        );
        let doc = Document::parse(&xml).unwrap();
        let name = child_elements(doc.root_element()).nth(2).unwrap();
        assert_eq!(name.text(), Some("A & B <Oy>"));
        assert!(xml.contains("<Environment>TEST</Environment>"));
        assert!(xml.contains("<CertificateRequest>Y3Ny</CertificateRequest>"));
    }

    #[test]
    fn optional_name_is_left_out_and_get_renew_order() {
        let get = get_request(&customer(None), "R1").unwrap();
        let names: Vec<_> = children(&get).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["Environment", "CustomerId", "RetrievalId"]);
        let renew = renew_request_unsigned(&customer(Some("Oy")), b"x").unwrap();
        let names: Vec<_> = children(&renew).into_iter().map(|(_, n)| n).collect();
        assert_eq!(
            names,
            [
                "Environment",
                "CustomerId",
                "CustomerName",
                "CertificateRequest"
            ]
        );
    }

    #[test]
    fn lengths_name_the_flag() {
        let e = sign_new_request(&customer(None), &"x".repeat(33), "pw", b"c").unwrap_err();
        assert_eq!(e.flag, "--transfer-id");
        let e = sign_new_request(&customer(None), "t", &"p".repeat(17), b"c").unwrap_err();
        assert_eq!(e.flag, "the transfer password");
        let mut c = customer(Some(&"n".repeat(101)));
        assert_eq!(
            sign_new_request(&c, "t", "p", b"c").unwrap_err().flag,
            "--customer-name"
        );
        c.customer_name = None;
        c.customer_id = "1".repeat(31);
        assert_eq!(get_request(&c, "r").unwrap_err().flag, "--customer-id");
    }

    #[test]
    fn reads_error_info_verbatim() {
        let el = response_unsigned(
            Operation::SignNew,
            None,
            None,
            &[ErrorInfo {
                code: "ERR_PWD".into(),
                message: "Väärä salasana & <tunnus>".into(),
            }],
        );
        let xml = envelope(&el);
        let doc = Document::parse(&xml).unwrap();
        let a = read_answer(body_element(&doc).unwrap(), Operation::SignNew).unwrap();
        assert!(!a.result.ok);
        assert_eq!(a.result.errors[0].message, "Väärä salasana & <tunnus>");
        assert_eq!(
            a.result.to_string(),
            "Status FAIL; ERR_PWD: Väärä salasana & <tunnus>"
        );
    }

    #[test]
    fn reads_certificate_and_retrieval_id() {
        let xml = envelope(&response_unsigned(Operation::Get, None, Some(b"DER"), &[]));
        let doc = Document::parse(&xml).unwrap();
        let a = read_answer(body_element(&doc).unwrap(), Operation::Get).unwrap();
        assert!(a.result.ok);
        assert_eq!(a.certificate.as_deref(), Some(&b"DER"[..]));
        let xml = envelope(&response_unsigned(Operation::Renew, Some("abc"), None, &[]));
        let doc = Document::parse(&xml).unwrap();
        assert!(read_answer(body_element(&doc).unwrap(), Operation::SignNew).is_err());
        let a = read_answer(body_element(&doc).unwrap(), Operation::Renew).unwrap();
        assert_eq!(a.retrieval_id.as_deref(), Some("abc"));
    }

    #[test]
    fn comments_do_not_change_values() {
        let xml = envelope(&response_unsigned(Operation::Renew, Some("ab"), None, &[]))
            .replace("<RetrievalId>ab", "<RetrievalId><!--evil-->a<!--x-->b");
        let doc = Document::parse(&xml).unwrap();
        let a = read_answer(body_element(&doc).unwrap(), Operation::Renew).unwrap();
        assert_eq!(a.retrieval_id.as_deref(), Some("ab"));
    }

    #[test]
    fn reads_fault() {
        let xml = fault("Server", "Internal & error");
        let doc = Document::parse(&xml).unwrap();
        assert_eq!(
            body_element(&doc).unwrap_err(),
            ParseError::Fault {
                code: "soapenv:Server".into(),
                message: "Internal & error".into()
            }
        );
    }
}
