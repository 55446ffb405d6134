<?php

declare(strict_types=1);

namespace Bwp;

/**
 * A local file that keeps the jobs bwp could not take (down, or its queue full), one JSON
 * batch per line, until a later dispatch sends them. Locked, so that the PHP-FPM workers of
 * one site can share it; a batch is removed only once bwp has accepted it.
 */
final class Spool
{
    public function __construct(public readonly string $path)
    {
    }

    /** @param list<array<string, mixed>> $jobs */
    public function keep(array $jobs): void
    {
        $line = json_encode($jobs, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES) . "\n";
        if (@file_put_contents($this->path, $line, FILE_APPEND | LOCK_EX) === false) {
            throw new Exception\BwpException("cannot write the spool file {$this->path}");
        }
    }

    /**
     * Hand every kept batch to $send, oldest first; stops at the first one bwp cannot take
     * now (that one and the rest stay); a batch bwp refuses as malformed is dropped, logged.
     *
     * @param callable(list<array<string, mixed>>): void $send
     * @return int the jobs sent
     */
    public function drain(callable $send): int
    {
        if (!is_file($this->path)) {
            return 0;
        }
        $file = @fopen($this->path, 'c+');
        if ($file === false) {
            return 0;
        }
        if (!flock($file, LOCK_EX | LOCK_NB)) {
            fclose($file);
            return 0; // another worker is draining it
        }
        $sent = 0;
        $left = [];
        try {
            $lines = array_values(array_filter(explode("\n", stream_get_contents($file) ?: '')));
            $left = $lines;
            foreach ($lines as $i => $line) {
                $jobs = json_decode($line, true);
                if (!is_array($jobs)) {
                    unset($left[$i]); // damaged: it would block the rest for ever
                    continue;
                }
                try {
                    $send($jobs);
                    $sent += count($jobs);
                } catch (Exception\Rejected $e) { // never accepted, however often sent
                    error_log("bwp: a spooled batch of " . count($jobs) . " jobs was refused and is dropped: "
                        . $e->getMessage());
                }
                unset($left[$i]);
            }
        } catch (Exception\BwpException) {
            // bwp still cannot take them: what is left stays
        } finally {
            ftruncate($file, 0);
            rewind($file);
            if ($left !== []) {
                fwrite($file, implode("\n", $left) . "\n");
            }
            flock($file, LOCK_UN);
            fclose($file);
        }
        return $sent;
    }

    /** Jobs waiting in the file. */
    public function count(): int
    {
        if (!is_file($this->path)) {
            return 0;
        }
        $n = 0;
        foreach (file($this->path, FILE_IGNORE_NEW_LINES | FILE_SKIP_EMPTY_LINES) ?: [] as $line) {
            $n += count(json_decode($line, true) ?: []);
        }
        return $n;
    }
}
