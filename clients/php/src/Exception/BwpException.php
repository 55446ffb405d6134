<?php

declare(strict_types=1);

namespace Bwp\Exception;

/** Anything the client could not do; the subclasses say why. */
class BwpException extends \RuntimeException
{
}
