<?php

declare(strict_types=1);

namespace Bwp\Exception;

/** 504 to a wait(): the jobs were accepted and go on, but did not finish in time. */
final class WaitTimeout extends BwpException
{
    /** @param list<string> $ids @param list<string> $pending */
    public function __construct(string $message, public readonly array $ids, public readonly array $pending)
    {
        parent::__construct($message, 504);
    }
}
