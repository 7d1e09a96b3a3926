//! The certificate service's SOAP messages: the three requests in the schema's element order
//! (children without a namespace, lengths checked), the envelope, and the stand-in's answers.
//! Reading answers is in [`super::answer`].

use base64::Engine;

use super::answer::ErrorInfo;
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
    use crate::certsvc::answer::child_elements;
    use roxmltree::Document;

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
}
