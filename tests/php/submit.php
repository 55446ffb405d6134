<?php
// Submits jobs to a bwp daemon exactly the way a PHP site does: curl_* and json_encode() with its
// DEFAULT flags, so "/" goes out as "\/" and non-ASCII text as "\uXXXX".
//
// Usage: php submit.php DAEMON_URL SINK_URL   (or the env variables BWP_URL and SINK_URL)
// Prints one JSON document on stdout: a list of
//   {"case": NAME, "sent": JSON_TEXT_POSTED, "status": HTTP_STATUS, "response": BODY, "error": CURL_ERROR}
// Exit status: 0 when every request got an HTTP answer (whatever its status), 1 on a curl error,
// 2 on bad usage, 3 when the curl extension is missing.

declare(strict_types=1);

$daemon = $argv[1] ?? getenv('BWP_URL');
$sink = $argv[2] ?? getenv('SINK_URL');
if (!$daemon || !$sink) {
    fwrite(STDERR, "usage: php submit.php DAEMON_URL SINK_URL (or BWP_URL / SINK_URL in the environment)\n");
    exit(2);
}
if (!function_exists('curl_init')) {
    fwrite(STDERR, "the PHP curl extension is not loaded\n");
    exit(3);
}
$daemon = rtrim($daemon, '/');
$sink = rtrim($sink, '/');

function submit(string $daemon, string $payload, array $extraHeaders = []): array
{
    $ch = curl_init($daemon . '/post/http');
    curl_setopt_array($ch, [
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => $payload,
        CURLOPT_HTTPHEADER => array_merge(['Content-Type: application/json'], $extraHeaders),
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_CONNECTTIMEOUT => 5,
        CURLOPT_TIMEOUT => 15,
        CURLOPT_PROXY => '',      // talk to the daemon directly, whatever http_proxy says
        CURLOPT_NOPROXY => '*',
    ]);
    $response = curl_exec($ch);
    $result = [
        'status' => curl_getinfo($ch, CURLINFO_RESPONSE_CODE),
        'response' => $response === false ? null : $response,
        'error' => $response === false ? curl_error($ch) : null,
    ];
    curl_close($ch);
    return $result;
}

$allBytes = '';
for ($i = 0; $i < 256; $i++) {
    $allBytes .= chr($i);
}
$rootBody = "root body \x00\x01\xfe\xff /slashes/ \"quoted\" end\r\n";

$cases = [];

// (a) a JSON array of two jobs: a GET whose parameters join the query string, a POST whose
// parameters become a form body.
$cases['a'] = [[
    'url' => $sink . '/a/get?fixed=1',
    'method' => 'GET',
    'parameters' => ['q' => 'a b/c', 'lang' => 'héllo wörld', 'empty' => ''],
], [
    'url' => $sink . '/a/post',
    'method' => 'POST',
    'parameters' => ['name' => 'Иван', 'redirect' => 'https://example.com/back?x=1&y=2', 'sum' => '1+1=2'],
]];

// (b) a binary body holding all 256 byte values, custom headers with slashes in their values.
$cases['b'] = [
    'url' => $sink . '/b/binary',
    'method' => 'PUT',
    'body' => base64_encode($allBytes),
    'headers' => [
        'Content-Type' => 'application/octet-stream',
        'X-Callback' => 'https://example.com/hooks/bwp?id=1/2',
        'X-Trace-Id' => 'abc/def/123',
        'Authorization' => 'Bearer a/b+c==',
    ],
];

// (c1) a root with a body and clones: every clone inherits method, headers and body; a clone's
// headers win; parameters are not a form body when there is a body.
$cases['c1'] = [
    'method' => 'POST',
    'body' => base64_encode($rootBody),
    'headers' => [
        'Content-Type' => 'application/octet-stream',
        'X-Sender' => 'php/test',
        'X-Override' => 'root',
    ],
    'clones' => [
        ['url' => $sink . '/c1/0', 'headers' => ['X-Secret' => 'puppies']],
        ['url' => $sink . '/c1/1?k=v/w', 'headers' => ['X-Secret' => 'kittens', 'X-Override' => 'clone1']],
        [
            'url' => $sink . '/c1/2',
            'headers' => ['X-Override' => 'clone2', 'Content-Type' => 'text/plain'],
            'parameters' => ['ignored' => 'yes'],
        ],
    ],
];

// (c2) a root with parameters and clones: the merged parameters (clone winning) become each
// clone's form body; the root has no url of its own.
$cases['c2'] = [
    'method' => 'POST',
    'headers' => ['X-Sender' => 'php/test', 'X-Override' => 'root'],
    'parameters' => ['shared' => 'root', 'site' => 'https://example.com/'],
    'clones' => [
        ['url' => $sink . '/c2/0', 'parameters' => ['site' => 'clone0/override']],
        ['url' => $sink . '/c2/1', 'headers' => ['X-Override' => 'clone1'], 'parameters' => ['extra' => '1']],
        ['url' => $sink . '/c2/2', 'headers' => ['X-Clone' => '2']],
    ],
];

$results = [];
$failed = false;
foreach ($cases as $name => $job) {
    $payload = json_encode($job);  // default flags on purpose
    if ($payload === false) {
        fwrite(STDERR, "json_encode failed for case $name: " . json_last_error_msg() . "\n");
        exit(1);
    }
    $results[] = ['case' => $name, 'sent' => $payload] + submit($daemon, $payload);
}

// (d) the same kind of request, gzip-compressed (Content-Encoding: gzip), when zlib is built in.
if (function_exists('gzencode')) {
    $payload = json_encode(['url' => $sink . '/d/gzip?x=1', 'method' => 'DELETE']);
    $results[] = ['case' => 'd', 'sent' => $payload]
        + submit($daemon, gzencode($payload), ['Content-Encoding: gzip']);
}

foreach ($results as $r) {
    if ($r['error'] !== null) {
        fwrite(STDERR, "case {$r['case']}: curl error: {$r['error']}\n");
        $failed = true;
    }
}
echo json_encode($results, JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
exit($failed ? 1 : 0);
