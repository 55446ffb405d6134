<?php

declare(strict_types=1);

namespace Bwp\Exception;

/** bwp did not answer: not running, wrong address or socket, or a timeout. */
final class Unreachable extends BwpException
{
}
