<?php

declare(strict_types=1);

namespace Bwp\Exception;

/** 503: the queue is full or the daemon is draining; nothing of the request was enqueued. */
final class Unavailable extends BwpException
{
    public function __construct(string $message, public readonly ?int $retryAfter = null)
    {
        parent::__construct($message, 503);
    }
}
