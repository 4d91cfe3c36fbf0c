//! API socket lines come from whoever can connect to the socket: `parse_request` must accept
//! or refuse any string without panicking, and an accepted request must serialise to JSON
//! that parses back to the same request. The client side parses the VMM's `Response` lines
//! the same way; those must not panic either and must survive a serialise/parse round trip.
#![no_main]

use keel_api::{parse_request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(line) {
        Ok(req) => {
            let json = serde_json::to_string(&req).expect("a Request always serialises");
            assert!(!json.contains('\n'), "one request per line: {json}");
            assert_eq!(parse_request(&json), Ok(req.clone()), "{line:?} -> {json}");
            // With the line framing's trailing newline too.
            assert_eq!(parse_request(&format!("{json}\n")), Ok(req));
        }
        Err(e) => assert!(e.starts_with("bad request: "), "{e}"),
    }
    if let Ok(resp) = serde_json::from_str::<Response>(line) {
        let json = serde_json::to_string(&resp).expect("a Response always serialises");
        let back: Response = serde_json::from_str(&json).expect("re-parse a serialised Response");
        // Floats in the balloon statistics may round differently; the envelope may not.
        assert_eq!((back.ok, &back.error), (resp.ok, &resp.error));
        assert_eq!(back.result.is_some(), resp.result.is_some());
    }
});
