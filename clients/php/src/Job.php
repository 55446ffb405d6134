<?php

declare(strict_types=1);

namespace Bwp;

/**
 * A job's status document (GET /jobs/{id}) as a record.
 */
final class Job
{
    private const PENDING = ['queued', 'delayed', 'running', 'retrying'];

    /** @param array<string, mixed> $doc */
    public function __construct(private readonly array $doc)
    {
    }

    public function id(): string
    {
        return (string) $this->doc['id'];
    }

    /** queued, delayed, running, retrying, succeeded, failed or cancelled */
    public function state(): string
    {
        return (string) $this->doc['state'];
    }

    public function queue(): string
    {
        return (string) ($this->doc['queue'] ?? 'default');
    }

    public function attempts(): int
    {
        return (int) ($this->doc['attempts'] ?? 0);
    }

    /** Not finished yet: waiting, delayed, being sent, or between attempts. */
    public function isPending(): bool
    {
        return in_array($this->state(), self::PENDING, true);
    }

    /** Finished for good, whatever the outcome. */
    public function isFinished(): bool
    {
        return !$this->isPending();
    }

    /** Sent, and the destination answered with a status below 400. */
    public function isCompleted(): bool
    {
        return $this->state() === 'succeeded';
    }

    /** Failed for good: a dead letter, replayable with Client::retry(). */
    public function hasFailed(): bool
    {
        return $this->state() === 'failed';
    }

    public function isCancelled(): bool
    {
        return $this->state() === 'cancelled';
    }

    /** The last attempt failed (an error, or a status of 400 or more). */
    public function hasError(): bool
    {
        return $this->error() !== null || ($this->status() ?? 0) >= 400;
    }

    /** What went wrong with the last attempt ("timeout: ...", "connect: ..."), if it did. */
    public function error(): ?string
    {
        return $this->doc['error'] ?? null;
    }

    /** The last answer's HTTP status. */
    public function status(): ?int
    {
        return isset($this->doc['status']) ? (int) $this->doc['status'] : null;
    }

    /**
     * The last answer: status, a few headers, the first KiB of its body, its size.
     *
     * @return array{status: int, headers: array<string, string>, body: string, size: int, truncated: bool, duration: float}|null
     */
    public function result(): ?array
    {
        return $this->doc['result'] ?? null;
    }

    public function createdAt(): ?\DateTimeImmutable
    {
        return self::time($this->doc['created'] ?? null);
    }

    public function finishedAt(): ?\DateTimeImmutable
    {
        return self::time($this->doc['finished'] ?? null);
    }

    public function nextAttemptAt(): ?\DateTimeImmutable
    {
        return self::time($this->doc['next_attempt'] ?? null);
    }

    /** @return array<string, mixed> */
    public function toArray(): array
    {
        return $this->doc;
    }

    private static function time(?string $text): ?\DateTimeImmutable
    {
        return $text === null ? null : new \DateTimeImmutable($text);
    }
}
