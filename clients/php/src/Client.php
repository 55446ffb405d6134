<?php

declare(strict_types=1);

namespace Bwp;

use Bwp\Exception\BwpException;
use Bwp\Exception\Rejected;
use Bwp\Exception\Unavailable;
use Bwp\Exception\Unreachable;
use Bwp\Exception\WaitTimeout;

/**
 * A connection to the local bwp daemon.
 *
 *     $bwp = Bwp\Client::local();                       // http://127.0.0.1:7012, or $BWP_URL
 *     $id = $bwp->post('https://crm.example/hook')->json($event)->onQueue('crm')->dispatch();
 *     $bwp->job($id)?->isCompleted();
 *
 * Options (all optional):
 *   token            bearer token (auth.tokens of the daemon)
 *   socket           unix socket path (the URL's host is then only the Host header)
 *   timeout          seconds for one call to the daemon (default 5), connect_timeout (default 1)
 *   retry_503        times a 503 (queue full, draining) is tried again (default 2), honouring
 *                    Retry-After up to max_retry_after seconds (default 2) each time
 *   batch            true: dispatch() collects the jobs and sends them in one POST when the PHP
 *                    request ends, after the response went to the browser (fastcgi_finish_request)
 *   on_failure       what dispatch() does when bwp cannot take a job: 'throw' (default: a
 *                    Bwp\Exception\*), 'spool' (keep it in `spool`, a file, for a later dispatch
 *                    to send), or 'drop' (error_log() it and go on)
 *   spool            the spool file path, for on_failure 'spool'
 */
final class Client
{
    private const DEFAULT_URL = 'http://127.0.0.1:7012';

    private string $base;
    /** @var array<string, mixed> */
    private array $options;
    private ?\CurlHandle $curl = null;
    /** @var list<array<string, mixed>> jobs waiting for the end of the request (batch mode) */
    private array $batch = [];
    private bool $flushRegistered = false;
    private ?Spool $spool = null;

    /** @param array<string, mixed> $options */
    public function __construct(string $url = self::DEFAULT_URL, array $options = [])
    {
        $this->base = rtrim($url, '/');
        $this->options = $options + [
            'token' => null, 'socket' => null, 'timeout' => 5.0, 'connect_timeout' => 1.0,
            'retry_503' => 2, 'max_retry_after' => 2.0, 'batch' => false, 'on_failure' => 'throw',
            'spool' => null,
        ];
        if (!in_array($this->options['on_failure'], ['throw', 'spool', 'drop'], true)) {
            throw new \InvalidArgumentException("on_failure must be 'throw', 'spool' or 'drop'");
        }
        if ($this->options['on_failure'] === 'spool') {
            if (!is_string($this->options['spool']) || $this->options['spool'] === '') {
                throw new \InvalidArgumentException("on_failure 'spool' needs the 'spool' file path");
            }
            $this->spool = new Spool($this->options['spool']);
        }
    }

    /**
     * The daemon on this host: $BWP_URL (or http://127.0.0.1:7012), $BWP_SOCKET for a unix
     * socket and $BWP_TOKEN for a token, unless $options say otherwise.
     *
     * @param array<string, mixed> $options
     */
    public static function local(array $options = []): self
    {
        $env = array_filter(['socket' => getenv('BWP_SOCKET') ?: null, 'token' => getenv('BWP_TOKEN') ?: null]);
        return new self(getenv('BWP_URL') ?: self::DEFAULT_URL, $options + $env);
    }

    public function post(string $url): PendingJob
    {
        return new PendingJob($this, 'POST', $url);
    }

    public function get(string $url): PendingJob
    {
        return new PendingJob($this, 'GET', $url);
    }

    public function put(string $url): PendingJob
    {
        return new PendingJob($this, 'PUT', $url);
    }

    public function patch(string $url): PendingJob
    {
        return new PendingJob($this, 'PATCH', $url);
    }

    public function delete(string $url): PendingJob
    {
        return new PendingJob($this, 'DELETE', $url);
    }

    public function request(string $method, string $url): PendingJob
    {
        return new PendingJob($this, $method, $url);
    }

    /** Collect dispatch()ed jobs and send them when the PHP request ends (or on flush()). */
    public function batching(bool $on = true): self
    {
        $this->options['batch'] = $on;
        return $this;
    }

    /**
     * Submit jobs (arrays as POST /post/http takes them) in one request, all or none: the
     * daemon's answer. Throws Unreachable, Unavailable (after the 503 retries), Rejected.
     *
     * @param list<array<string, mixed>> $jobs
     * @return array<string, mixed>
     */
    public function submit(array $jobs): array
    {
        return $this->call('POST', '/post/http', $jobs);
    }

    /** Send the jobs batched so far now (one POST); their ids. */
    public function flush(): array
    {
        $jobs = $this->batch;
        $this->batch = [];
        if ($jobs === []) {
            return [];
        }
        $this->handOver($jobs);
        return array_map(static fn (array $j): string => $j['id'], $jobs);
    }

    /** The job's status, or null when the daemon does not know the id (or no longer). */
    public function job(string $id): ?Job
    {
        [$status, $body] = $this->raw('GET', '/jobs/' . rawurlencode($id));
        if ($status === 404) {
            return null;
        }
        return new Job($this->checked($status, $body, null));
    }

    /**
     * Failed jobs (dead letters), newest first.
     *
     * @return list<Job>
     */
    public function deadLetters(int $limit = 100, int $offset = 0): array
    {
        $page = $this->call('GET', "/jobs?state=failed&limit=$limit&offset=$offset");
        return array_map(static fn (array $doc): Job => new Job($doc), $page['jobs']);
    }

    /** Replay a dead letter under its id. */
    public function retry(string $id): void
    {
        $this->call('POST', '/jobs/' . rawurlencode($id) . '/retry');
    }

    /** Cancel a job that has not started; its status, now cancelled. */
    public function cancel(string $id): Job
    {
        return new Job($this->call('DELETE', '/jobs/' . rawurlencode($id)));
    }

    // ---- used by PendingJob --------------------------------------------------------------

    /** @param array<string, mixed> $job @internal */
    public function dispatchJob(array $job, bool $now = false): ?string
    {
        if ($this->options['batch'] && !$now) {
            $job['id'] ??= bin2hex(random_bytes(10)); // dispatch() answers before bwp does
            $this->batch[] = $job;
            $this->registerFlush();
            return $job['id'];
        }
        $answer = $this->handOver([$job]);
        if ($answer === null || in_array($job['id'] ?? null, $answer['duplicates'] ?? [], true)) {
            return null;
        }
        return $answer['ids'][0] ?? null;
    }

    /** @param array<string, mixed> $job @internal */
    public function waitFor(array $job, float $seconds): Job
    {
        $answer = $this->call('POST', '/post/http', $job + ['wait' => $seconds], timeout: $seconds + 5);
        return new Job($answer['results'][0]);
    }

    // ---- the transport -------------------------------------------------------------------

    /**
     * Submit, and on failure do what on_failure says; what is spooled goes first next time.
     *
     * @param list<array<string, mixed>> $jobs
     * @return array<string, mixed>|null the answer, null when spooled or dropped
     */
    private function handOver(array $jobs): ?array
    {
        try {
            $this->spool?->drain(fn (array $kept) => $this->submit($kept));
            return $this->submit($jobs);
        } catch (Unreachable | Unavailable $e) {
            if ($this->options['on_failure'] === 'throw') {
                throw $e;
            }
            if ($this->spool !== null) {
                $this->spool->keep($jobs);
                error_log('bwp: ' . count($jobs) . ' job(s) spooled to ' . $this->spool->path . ': ' . $e->getMessage());
            } else {
                error_log('bwp: ' . count($jobs) . ' job(s) dropped: ' . $e->getMessage());
            }
            return null;
        }
    }

    private function registerFlush(): void
    {
        if ($this->flushRegistered) {
            return;
        }
        $this->flushRegistered = true;
        register_shutdown_function(function (): void {
            if (function_exists('fastcgi_finish_request')) {
                fastcgi_finish_request(); // the page is out; the jobs go now
            }
            try {
                $this->flush();
            } catch (BwpException $e) { // nobody to throw to any more
                error_log('bwp: jobs of this request were not sent: ' . $e->getMessage());
            }
        });
    }

    /**
     * One call, with the 503 retries; the decoded answer of a 2xx.
     *
     * @return array<string, mixed>
     */
    private function call(string $method, string $path, mixed $payload = null, ?float $timeout = null): array
    {
        $tries = 0;
        while (true) {
            [$status, $body, $retryAfter] = $this->raw($method, $path, $payload, $timeout);
            if ($status !== 503 || $tries >= $this->options['retry_503']) {
                return $this->checked($status, $body, $retryAfter);
            }
            $tries++;
            $wait = min((float) $this->options['max_retry_after'], (float) ($retryAfter ?? 1));
            usleep((int) (max(0.05, $wait) * 1e6));
        }
    }

    /**
     * @return array<string, mixed>
     */
    private function checked(int $status, mixed $body, mixed $retryAfter): array
    {
        $message = is_array($body) ? (string) ($body['error'] ?? json_encode($body)) : trim((string) $body);
        if ($status >= 200 && $status < 300) {
            return is_array($body) ? $body : ['success' => true];
        }
        if ($status === 503) {
            throw new Unavailable("bwp: 503 $message", is_numeric($retryAfter) ? (int) $retryAfter : null);
        }
        if ($status === 504 && is_array($body)) {
            throw new WaitTimeout("bwp: $message", $body['ids'] ?? [], $body['pending'] ?? []);
        }
        if ($status >= 400 && $status < 500) {
            throw new Rejected("bwp: $status $message", $status);
        }
        throw new BwpException("bwp: unexpected answer $status $message", $status);
    }

    /**
     * @return array{0: int, 1: mixed, 2: string|null} status, decoded body, Retry-After
     */
    private function raw(string $method, string $path, mixed $payload = null, ?float $timeout = null): array
    {
        $curl = $this->curl ??= curl_init();
        curl_reset($curl);
        $headers = ['Expect:']; // no 100-continue round trip for bodies over 1 KiB
        if ($this->options['token'] !== null) {
            $headers[] = 'Authorization: Bearer ' . $this->options['token'];
        }
        $retryAfter = null;
        $options = [
            CURLOPT_URL => $this->base . $path,
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_CONNECTTIMEOUT_MS => (int) ($this->options['connect_timeout'] * 1000),
            CURLOPT_TIMEOUT_MS => (int) (($timeout ?? $this->options['timeout']) * 1000),
            CURLOPT_HEADERFUNCTION => static function ($ch, string $line) use (&$retryAfter): int {
                if (stripos($line, 'retry-after:') === 0) {
                    $retryAfter = trim(substr($line, 12));
                }
                return strlen($line);
            },
        ];
        if ($payload !== null) {
            $headers[] = 'Content-Type: application/json';
            $options[CURLOPT_POSTFIELDS] = json_encode($payload, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES);
        }
        if ($this->options['socket'] !== null) {
            $options[CURLOPT_UNIX_SOCKET_PATH] = $this->options['socket'];
        }
        $options[CURLOPT_HTTPHEADER] = $headers;
        curl_setopt_array($curl, $options);
        $text = curl_exec($curl);
        if ($text === false) {
            $where = $this->options['socket'] ?? $this->base;
            throw new Unreachable("bwp at $where does not answer: " . curl_error($curl), curl_errno($curl));
        }
        $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        $body = json_decode((string) $text, true);
        return [$status, $body ?? $text, $retryAfter];
    }
}
