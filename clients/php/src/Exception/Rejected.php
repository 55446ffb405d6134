<?php

declare(strict_types=1);

namespace Bwp\Exception;

/** A 4xx answer: the request was wrong (its message says how) or not authorised. */
final class Rejected extends BwpException
{
}
