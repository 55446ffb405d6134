<?php

declare(strict_types=1);

namespace Bwp;

/**
 * One job being described, fluently and in any order, then dispatched:
 *
 *     $client->post('https://shop.example/hook')->json(['order' => 42])->onQueue('hooks')
 *         ->delay('PT10M')->withId('order-42')->unique()->retries(5)->dispatch();
 */
final class PendingJob
{
    /** @var array<string, mixed> */
    private array $job;

    public function __construct(private readonly Client $client, string $method, string $url)
    {
        $this->job = ['url' => $url, 'method' => strtoupper($method)];
    }

    /** Any JSON value as the body, sent as application/json (unless a header says otherwise). */
    public function json(mixed $value): self
    {
        unset($this->job['body']);
        $this->job['json'] = $value;
        return $this;
    }

    /** The raw body, as bytes. */
    public function body(string $raw): self
    {
        unset($this->job['json']);
        $this->job['body'] = base64_encode($raw);
        return $this;
    }

    /**
     * Form fields: a urlencoded body (or, for GET and HEAD, the query string).
     *
     * @param array<string, scalar> $fields
     */
    public function form(array $fields): self
    {
        $this->job['parameters'] = array_map('strval', $fields);
        return $this;
    }

    public function header(string $name, string $value): self
    {
        $this->job['headers'][$name] = $value;
        return $this;
    }

    /** @param array<string, string> $headers */
    public function headers(array $headers): self
    {
        foreach ($headers as $name => $value) {
            $this->header((string) $name, (string) $value);
        }
        return $this;
    }

    public function onQueue(string $queue): self
    {
        $this->job['queue'] = $queue;
        return $this;
    }

    /**
     * When the first attempt is due: seconds (int or float), an ISO 8601 duration ('PT10M',
     * 'P1M'), text DateInterval::createFromDateString() understands ('1 day + 6 hours'), a
     * DateInterval, or a DateTimeInterface (a point in time).
     */
    public function delay(int|float|string|\DateInterval|\DateTimeInterface $when): self
    {
        unset($this->job['delay'], $this->job['at']);
        if ($when instanceof \DateTimeInterface) {
            $this->job['at'] = \DateTimeImmutable::createFromInterface($when)
                ->setTimezone(new \DateTimeZone('UTC'))->format('Y-m-d\TH:i:s.v\Z');
            return $this;
        }
        if (is_string($when)) {
            $when = self::interval($when);
        }
        if ($when instanceof \DateInterval) {
            $now = new \DateTimeImmutable();
            $seconds = (float) $now->add($when)->format('U.u') - (float) $now->format('U.u');
            if ($seconds < 0) {
                throw new \InvalidArgumentException('delay: the interval is negative');
            }
            $when = $seconds;
        }
        if ($when < 0) {
            throw new \InvalidArgumentException('delay: seconds must be >= 0');
        }
        $this->job['delay'] = $when;
        return $this;
    }

    /** Same as delay() with a point in time. */
    public function at(\DateTimeInterface $when): self
    {
        return $this->delay($when);
    }

    /** Your own id for the job (the daemon makes one otherwise). */
    public function withId(string $id): self
    {
        $this->job['id'] = $id;
        return $this;
    }

    /** With an id: not enqueued while a job with that id is pending. */
    public function unique(): self
    {
        $this->job['unique'] = true;
        return $this;
    }

    /** With an id: not enqueued if a job with that id ran at all (within the history). */
    public function once(): self
    {
        $this->job['once'] = true;
        return $this;
    }

    /** Extra attempts after the first, instead of the queue's policy. */
    public function retries(int $retries): self
    {
        $this->job['retries'] = $retries;
        return $this;
    }

    /** Seconds one attempt may take, instead of the daemon's read timeout. */
    public function timeout(float $seconds): self
    {
        $this->job['timeout'] = $seconds;
        return $this;
    }

    /** A URL that receives the outcome as a JSON POST once the job has finished. */
    public function callback(string $url): self
    {
        $this->job['callback'] = $url;
        return $this;
    }

    /** Count this job's errors and timeouts per destination host in the daemon's metrics. */
    public function hostMetrics(bool $on = true): self
    {
        $this->job['hostMetrics'] = $on;
        return $this;
    }

    /** @return array<string, mixed> the job as POST /post/http takes it */
    public function toArray(): array
    {
        return $this->job;
    }

    /**
     * Hand the job to bwp. Returns its id, or null when unique()/once() skipped it as a
     * duplicate (or the daemon assigns no ids, as the Go daemon). With batching on, the job
     * is sent with the others when the PHP request ends, under an id made here if it has none.
     */
    public function dispatch(): ?string
    {
        return $this->client->dispatchJob($this->job);
    }

    /** Dispatch now, even when the client batches. */
    public function dispatchNow(): ?string
    {
        return $this->client->dispatchJob($this->job, now: true);
    }

    /**
     * Request-reply: send now and wait up to $seconds for the outcome.
     *
     * @throws Exception\WaitTimeout when it has not finished in time (it goes on)
     */
    public function wait(float $seconds): Job
    {
        return $this->client->waitFor($this->job, $seconds);
    }

    private static function interval(string $text): \DateInterval
    {
        if ($text !== '' && ($text[0] === 'P' || $text[0] === 'p')) {
            try {
                return new \DateInterval(strtoupper($text));
            } catch (\Exception) {
                throw new \InvalidArgumentException("delay: '$text' is not an ISO 8601 duration");
            }
        }
        $interval = @\DateInterval::createFromDateString($text);
        if ($interval === false || self::isEmpty($interval) && !preg_match('/^\s*0/', $text)) {
            throw new \InvalidArgumentException("delay: '$text' is not a duration");
        }
        return $interval;
    }

    private static function isEmpty(\DateInterval $i): bool
    {
        return $i->y === 0 && $i->m === 0 && $i->d === 0 && $i->h === 0 && $i->i === 0
            && $i->s === 0 && (float) $i->f === 0.0;
    }
}
