// Download a URL with Node's built-in fetch and read the whole body.
//
// usage: node fetch_get.mjs URL AUTHORIZATION
// Prints "first" once the first body chunk has arrived, then the total byte
// count ("bytes N") at the end. Exits 0 only when the body was read to its
// end without error and the status was 2xx; any error exits non-zero.
// For TLS, pass the CA with the NODE_EXTRA_CA_CERTS environment variable.

const [url, authorization] = process.argv.slice(2);

async function main() {
  const res = await fetch(url, { headers: { Authorization: authorization } });
  if (!res.ok) {
    console.error(`status ${res.status}`);
    return 3;
  }
  const reader = res.body.getReader();
  let total = 0;
  let first = true;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (first) {
      first = false;
      process.stdout.write("first\n");
    }
  }
  process.stdout.write(`bytes ${total}\n`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`error: ${err && err.cause ? err.cause : err}`);
    process.exit(1);
  },
);
